#!/bin/sh
# Lab check of the worker's kvm backend (run in L1 as /payload/run.sh; see tests/kvm_lab.rs):
# `vmfarm up` on the tiny image in /payload/images, one job (kvm-job.toml) through the integrated
# VMM with the agent's SSH over vsock and a cache disk, fetching from an HTTP server in L1 through the worker's
# proxy (the guest network), its artifacts back through the CLI; while it runs, the
# jailed VMM's user, capabilities, seccomp mode, namespaces, root, environment and cgroup are read
# from /proc. Then three jobs of kvm-warm-job.toml: the first boots cold and has the image's
# template snapshot made, the other two are restored from it at once.
# Prints "LAB-CHECK <name> ok|FAIL <detail>" lines and "LAB-TIME <what> <seconds>" figures.
up() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.2f", b - a }'; }
fail=0
check() { if [ "$2" = 0 ]; then echo "LAB-CHECK $1 ok $3"; else echo "LAB-CHECK $1 FAIL $3"; fail=1; fi; }
command -v vmfarm >/dev/null || { echo "LAB-CHECK vmfarm-binary FAIL not in the payload"; exit 1; }

# The server listens on loopback.
ip link set lo up
export VMFARM_DATA=/tmp/farm
mkdir -p "$VMFARM_DATA/images"
cp -a /payload/images/. "$VMFARM_DATA/images/"

# A host-side HTTP server the job fetches from through the worker's proxy.
mkdir -p /tmp/www && echo "hello-from-L1" > /tmp/www/hello.txt
busybox httpd -p 127.0.0.1:80 -h /tmp/www

# The L2 guest boots under nested SVM inside TCG, on a host that runs other tests meanwhile: its
# kernel alone may take a minute there (the worker's default boot limit). This checks the VMM's
# path, not its speed (that is `vmfarm bench boot`'s).
printf '[guest]\nboot_timeout = "180s"\n' > /tmp/worker.toml

t0=$(up)
vmfarm up --data "$VMFARM_DATA" --no-build --allow-private 127.0.0.0/8 \
  --worker-config /tmp/worker.toml > /tmp/up.log 2>&1 &
farm=$!
i=0
while ! grep -q "vmfarm is up" /tmp/up.log && [ $i -lt 600 ] && kill -0 $farm 2>/dev/null; do
  sleep 0.1; i=$((i + 1))
done
grep -q "vmfarm is up" /tmp/up.log; check farm-up $? "in $(since "$t0") s"

# The jailed VMM, read from /proc while the job runs: the `vm run` process whose NSpid ends in 1
# (PID 1 of its own PID namespace; its parent is the jail's waiting process).
jail_check() {
  i=0; pid=
  while [ -z "$pid" ] && [ $i -lt 1200 ] && [ ! -e /tmp/submit.done ]; do
    for p in /proc/[0-9]*; do
      tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q "^[^ ]* vm run .*--jail " || continue
      ns=$(awk '/^NSpid:/ {print $NF}' "$p/status" 2>/dev/null)
      [ "$ns" = 1 ] && [ "$(awk '/^Seccomp:/ {print $2}' "$p/status")" = 2 ] && pid=${p#/proc/} && break
    done
    [ -z "$pid" ] && sleep 0.1; i=$((i + 1))
  done
  [ -n "$pid" ] || { echo "LAB-CHECK vmm-jailed FAIL no jailed vm run process with its filter on while the job ran"; return 1; }
  st=/proc/$pid/status
  uid=$(awk '/^Uid:/ {print $2 "," $3 "," $4 "," $5}' $st)
  caps=$(awk '/^CapEff:/ {print $2}' $st)
  seccomp=$(awk '/^Seccomp:/ {print $2}' $st)
  nnp=$(awk '/^NoNewPrivs:/ {print $2}' $st)
  nss=; for n in mnt pid ipc uts net; do [ "$(readlink /proc/$pid/ns/$n)" != "$(readlink /proc/self/ns/$n)" ] && nss="$nss $n"; done
  root=$(ls /proc/$pid/root | tr '\n' ' ')
  dev=$(ls /proc/$pid/root/dev | tr '\n' ' ')
  env=$(wc -c < /proc/$pid/environ)
  cg=$(cat /proc/$pid/cgroup)
  mem=$(cat /sys/fs/cgroup${cg#0::}/memory.max 2>/dev/null)
  detail="pid=$pid uid=$uid caps=$caps seccomp=$seccomp nnp=$nnp own-ns=[$nss ] root=[$root] dev=[$dev] environ=${env}B cgroup=${cg#0::} memory.max=$mem"
  u=${uid%%,*}
  [ "$u" -ge 960000 ] && [ "$uid" = "$u,$u,$u,$u" ] && [ "$caps" = 0000000000000000 ] && [ "$seccomp" = 2 ] \
    && [ "$nnp" = 1 ] && [ "$nss" = " mnt pid ipc uts net" ] && [ "$dev" = "kvm " ] && [ "$env" = 0 ] \
    && ! echo "$root" | grep -qw -e etc -e usr -e proc -e payload \
    && echo "$root" | grep -qw overlay.qcow2 && echo "$cg" | grep -q "/vmfarm/worker-[0-9]*/guest-$u$" && [ -n "$mem" ]
  check vmm-jailed $? "$detail"
  return $fail
}

# `vmfarm ssh` through the server into the running guest (the job's `ssh` task waits for it):
# a command, its output and exit status (the farm's first job is job 1).
ssh_check() {
  i=0
  while ! vmfarm status 1 2>/dev/null | grep -q "ssh:running" && [ $i -lt 3000 ] && [ ! -e /tmp/submit.done ]; do
    sleep 0.1; i=$((i + 1))
  done
  t=$(up)
  out=$(timeout 60 vmfarm ssh 1 -- 'echo "via ssh $(hostname)" > ssh-was-here; cat ssh-was-here; exit 7' 2>&1)
  rc=$?
  echo "LAB-TIME ssh-command $(since "$t")"
  [ $rc = 7 ] && [ "$out" = "via ssh job-1" ]; check ssh-session $? "rc=$rc out=[$out]"
  return $fail
}

t1=$(up)
jail_check &
jailer=$!
ssh_check &
sshcheck=$!
timeout 330 vmfarm submit --follow /payload/kvm-job.toml > /tmp/submit.out 2> /tmp/submit.err
rc=$?
touch /tmp/submit.done
wait $jailer || fail=1
wait $sshcheck || fail=1
echo "LAB-TIME submit-to-end $(since "$t1")"
sed 's/^/[submit] /' /tmp/submit.out /tmp/submit.err
id=$(head -1 /tmp/submit.out | cut -f1)
[ $rc = 0 ] && grep -q "succeeded" /tmp/submit.err; check job-succeeded $? "job $id rc=$rc: $(tail -1 /tmp/submit.err)"
grep -q "LAB-JOB kernel .* vcpus 1" /tmp/submit.out; check job-log-streamed $? "$(grep -m1 'LAB-JOB kernel' /tmp/submit.out)"
grep -q "LAB-JOB an ssh session came: via ssh job-1" /tmp/submit.out && grep -q "ssh: admin opened a session" /tmp/submit.out
check job-ssh-seen $? "$(grep -m1 'LAB-JOB an ssh' /tmp/submit.out); $(grep -m1 'ssh: admin' /tmp/submit.out)"
grep -q "LAB-JOB cache mounted and written" /tmp/submit.out && grep -q "cache lab: stored as version 2" /tmp/submit.out
check job-cache $? "$(grep -m1 'LAB-JOB cache' /tmp/submit.out); $(grep -m1 'cache lab: ' /tmp/submit.out)"
grep -q "LAB-JOB fetched hello-from-L1" /tmp/submit.out && grep -q "network 127.0.0.1:80: " /tmp/submit.out
check job-network $? "$(grep -m1 'LAB-JOB fetched' /tmp/submit.out); $(grep -m1 'network 127.0.0.1:80' /tmp/submit.out)"

mkdir -p /tmp/arts
vmfarm artifacts "$id" --out /tmp/arts > /tmp/arts.log 2>&1
a=$?
sed 's/^/[artifacts] /' /tmp/arts.log
want=$(cut -d' ' -f1 /tmp/arts/out/random.sha256 2>/dev/null)
got=$(sha256sum /tmp/arts/out/random.bin 2>/dev/null | cut -d' ' -f1)
size=$(wc -c < /tmp/arts/out/random.bin 2>/dev/null)
[ $a = 0 ] && [ -n "$want" ] && [ "$want" = "$got" ] && [ "$size" = 1048576 ]
check artifact-intact $? "size=$size guest=$want here=$got"

# Warm starts: the first job without a cache disk finds no template snapshot, boots cold and
# has one made (`vm run --save`); the next two start from it (`vm run --restore`), together.
warm() { timeout 300 vmfarm submit --follow /payload/kvm-warm-job.toml > "/tmp/warm$1.out" 2> "/tmp/warm$1.err"; }
# Every half second, each jailed VMM's resident and proportional memory (KiB), by kind: cold
# boot, the template being made (--save), restored (--restore).
memwatch() {
  while [ -e /tmp/memwatch.on ]; do
    for p in /proc/[0-9]*; do
      c=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)
      case "$c" in *" vm run "*) ;; *) continue ;; esac
      [ "$(awk '/^NSpid:/ {print $NF}' "$p/status" 2>/dev/null)" = 1 ] || continue
      kind=cold; case "$c" in *--restore*) kind=restored ;; *--save*) kind=template ;; esac
      awk -v k=$kind -v p="${p#/proc/}" '/^Rss:/ {r=$2} /^Pss:/ {s=$2} END {if (r) print k, p, r, s}' "$p/smaps_rollup" 2>/dev/null
    done >> /tmp/mem.samples
    sleep 0.5
  done
}
touch /tmp/memwatch.on
memwatch &
watcher=$!
warm 1; w1=$?
i=0
while ! grep -q -e "made the template snapshot" -e "its jobs boot cold" /tmp/up.log && [ $i -lt 3600 ]; do
  sleep 0.1; i=$((i + 1))
done
grep -q "made the template snapshot" /tmp/up.log
check template-made $? "$(grep -m1 -o -e 'made the template snapshot.*' -e 'its jobs boot cold.*' /tmp/up.log)"
# A first attempt that failed (the worker tries twice) is shown, not failed on.
grep -m1 -o 'snapshot failed; trying once more.\{0,600\}' /tmp/up.log | sed 's/^/LAB-NOTE /'
warm 2 & p2=$!
warm 3 & p3=$!
wait $p2; w2=$?
wait $p3; w3=$?
rm -f /tmp/memwatch.on
wait $watcher
# The most each VMM held while its job ran (two restored guests share the snapshot's pages).
awk '{k = $1 " pid " $2; if ($3 > r[k]) r[k] = $3; if ($4 > s[k]) s[k] = $4}
  END {for (k in r) printf "LAB-TIME vmm-memory %s rss %.1f MiB pss %.1f MiB\n", k, r[k] / 1024, s[k] / 1024}' /tmp/mem.samples | sort
for n in 1 2 3; do sed "s/^/[warm $n] /" /tmp/warm$n.out /tmp/warm$n.err; done
said() { cat "/tmp/warm$1.out" "/tmp/warm$1.err"; }
ready() { said "$1" | grep -m1 -o 'guest ready in [0-9.]*s' | grep -o '[0-9.]*'; }
[ $w1 = 0 ] && said 1 | grep -q "booting cold"; check warm-first-cold $? "rc=$w1 $(said 1 | grep -m1 -o '[^]]*booting cold.*')"
[ $w2 = 0 ] && [ $w3 = 0 ] && said 2 | grep -q "restored the guest from its image's template snapshot" \
  && said 3 | grep -q "restored the guest from its image's template snapshot"
check warm-restored $? "rc=$w2,$w3 $(said 2 | grep -m1 -o 'restored the guest.*')"
echo "LAB-TIME cold-boot-to-agent-ready $(ready 1)"
echo "LAB-TIME restore-to-agent-ready $(ready 2) $(ready 3)"
# The VMM's own time: a cold VM built (kernel loaded), a restored one (its state put back) and
# where that went, as the worker logged them.
tr -d '\033' < /tmp/up.log | sed 's/\[[0-9;]*m//g' | grep -o -e 'build_ms[^ ]*' -e 'the VMM restored the guest in .*' | sed 's/^/LAB-TIME vmm /'
r1=$(said 1 | grep -m1 -o 'LAB-WARM random [0-9a-f]*'); r2=$(said 2 | grep -m1 -o 'LAB-WARM random [0-9a-f]*'); r3=$(said 3 | grep -m1 -o 'LAB-WARM random [0-9a-f]*')
k2=$(said 2 | grep -m1 -o 'host key SHA256:[^)]*'); k3=$(said 3 | grep -m1 -o 'host key SHA256:[^)]*')
[ ${#r2} -gt 70 ] && [ "$r1" != "$r2" ] && [ "$r2" != "$r3" ] && [ "$r1" != "$r3" ] && [ -n "$k2" ] && [ "$k2" != "$k3" ] \
  && said 2 | grep -q "LAB-WARM host job-[0-9]* year 20" && [ "$(said 2 | grep -m1 -o 'LAB-WARM host [^ ]*')" != "$(said 3 | grep -m1 -o 'LAB-WARM host [^ ]*')" ]
check warm-identity $? "[$r2] [$r3] [$k2] [$k3] $(said 2 | grep -m1 -o 'LAB-WARM host.*') / $(said 3 | grep -m1 -o 'LAB-WARM host.*')"
# Restored guests had their VM generation ID changed and announced: the GED's line rang once
# (a kernel with the vmgenid driver reseeds from the new ID; Debian's cloud kernel has none, so
# "vmgenid 0" here); the cold guest's never rang.
g1=$(said 1 | grep -m1 -o 'LAB-WARM ged.*'); g2=$(said 2 | grep -m1 -o 'LAB-WARM ged.*')
echo "$g2" | grep -q "LAB-WARM ged 1 " && echo "$g1" | grep -q "LAB-WARM ged 0 "
check warm-vmgenid $? "cold [$g1] restored [$g2]"
wid=$(head -1 /tmp/warm2.out | cut -f1)
mkdir -p /tmp/warm-arts
vmfarm artifacts "$wid" --out /tmp/warm-arts > /tmp/warm-arts.log 2>&1
grep -q "^made by job-$wid$" /tmp/warm-arts/out/warm.txt 2>/dev/null
check warm-artifact $? "job $wid: $(cat /tmp/warm-arts/out/warm.txt 2>/dev/null) $(tail -1 /tmp/warm-arts.log)"

grep -q "integrated VMM" /tmp/up.log; check backend-kvm $? "$(grep -m1 -o 'backend=[a-z]*.*VMM[^"]*' /tmp/up.log)"
grep -q "each VMM runs jailed as its own user .* (v2)" /tmp/up.log; check jail-on $? "$(grep -m1 -o 'each VMM runs jailed[^"]*' /tmp/up.log)"

# The guest and its overlay are gone once the job ended.
sleep 1
guests=$(for p in /proc/[0-9]*; do tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep "^[^ ]* vm run "; done | head -3)
left=$(ls -A "$VMFARM_DATA/work" 2>/dev/null | head -3)
[ -z "$guests" ] && [ -z "$left" ]; check guest-cleaned-up $? "guests=[$guests] work=[$left]"

kill $farm 2>/dev/null
wait $farm 2>/dev/null
sed 's/^/[vmfarm up] /' /tmp/up.log
exit $fail
