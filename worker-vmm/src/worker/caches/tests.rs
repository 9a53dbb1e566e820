use super::*;
use crate::vmm::qcow2::chain::Chain;
use vmfarm_proto::units::MIB;

const SIZE: ByteSize = ByteSize(64 * MIB);
/// Past the ext4 superblock's first group, so the file system stays whole.
const AT: u64 = 32 * MIB;

fn store(dir: &Path) -> Arc<Caches> {
    Caches::open_for_worker(&config(dir)).unwrap()
}

fn config(dir: &Path) -> CachesConfig {
    CachesConfig {
        dir: dir.join("caches"),
        ..CachesConfig::default()
    }
}

fn key(name: &str) -> CacheKey {
    CacheKey {
        owner: "alice".into(),
        image: "tiny".into(),
        name: name.into(),
    }
}

/// Writes `data` into the disk at `overlay`, as the guest would (whole sectors).
fn write(overlay: &Path, data: &[u8]) {
    let mut chain = Chain::open(overlay, false).unwrap();
    let mut sectors = data.to_vec();
    sectors.resize(data.len().next_multiple_of(512), 0);
    chain.write_at(&sectors, AT).unwrap();
    chain.flush().unwrap();
}

fn read(overlay: &Path, len: usize) -> Vec<u8> {
    let mut chain = Chain::open(overlay, true).unwrap();
    let mut buf = vec![0; len.next_multiple_of(512)];
    chain.read_at(&mut buf, AT).unwrap();
    buf.truncate(len);
    buf
}

#[test]
fn test_a_job_finds_what_the_last_successful_one_stored_and_a_failed_one_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let caches = store(tmp.path());
    let first = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("job1.qcow2"))
        .unwrap();
    assert_eq!(first.started_on, None);
    assert!(first.why_empty.as_deref().unwrap().contains("none yet"));
    write(&first.overlay, b"first");
    assert!(caches.held().unwrap().is_empty(), "nothing stored yet");
    assert_eq!(caches.commit(first).unwrap(), "stored as version 2");
    let held = caches.held().unwrap();
    assert_eq!(
        (held.len(), held[0].name.as_str()),
        (1, "pip"),
        "a lease names what was just stored"
    );

    let failed = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("job2.qcow2"))
        .unwrap();
    assert_eq!(failed.started_on, Some(2));
    assert_eq!(read(&failed.overlay, 5), b"first");
    write(&failed.overlay, b"fails");
    drop(failed);

    let third = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("job3.qcow2"))
        .unwrap();
    assert_eq!(third.started_on, Some(2));
    assert_eq!(read(&third.overlay, 5), b"first");
    let listed = caches.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].version, listed[0].size, listed[0].depth),
        (2, SIZE, 2)
    );
}

#[test]
fn test_two_jobs_that_succeed_together_leave_the_last_ones_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let caches = store(tmp.path());
    let base = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("a.qcow2"))
        .unwrap();
    caches.commit(base).unwrap();
    let one = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("b.qcow2"))
        .unwrap();
    let two = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("c.qcow2"))
        .unwrap();
    write(&one.overlay, b"one");
    write(&two.overlay, b"two");
    assert_eq!(caches.commit(one).unwrap(), "stored as version 3");
    let said = caches.commit(two).unwrap();
    assert!(
        said.starts_with("stored as version 4 (version 3 was stored by another job"),
        "{said}"
    );
    let next = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("d.qcow2"))
        .unwrap();
    assert_eq!(read(&next.overlay, 3), b"two");
    let folder = caches.folder(&key("pip"));
    assert!(
        !version_file(&folder, 3).exists(),
        "the lost version is removed"
    );
}

#[test]
fn test_what_a_killed_commit_leaves_is_removed_and_the_previous_version_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let caches = store(tmp.path());
    let first = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("a.qcow2"))
        .unwrap();
    write(&first.overlay, b"kept");
    caches.commit(first).unwrap();
    let job = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("b.qcow2"))
        .unwrap();
    write(&job.overlay, b"lost");
    // Each point a kill can stop the commit at: the overlay moved in, renamed to its version,
    // `current.tmp` written but not yet renamed over `current`.
    let folder = caches.folder(&key("pip"));
    std::fs::copy(&job.overlay, folder.join("incoming.tmp")).unwrap();
    std::fs::copy(&job.overlay, version_file(&folder, 3)).unwrap();
    std::fs::write(folder.join("current.tmp"), "3\n").unwrap();
    drop(job);
    drop(caches);

    let caches = store(tmp.path());
    let mut left: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["current", "used", "v1.qcow2", "v2.qcow2"]);
    let next = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("c.qcow2"))
        .unwrap();
    assert_eq!(next.started_on, Some(2));
    assert_eq!(read(&next.overlay, 4), b"kept");
}

#[test]
fn test_a_new_size_starts_empty_and_limits_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let caches = store(tmp.path());
    let first = caches
        .check_out(&key("pip"), SIZE, &tmp.path().join("a.qcow2"))
        .unwrap();
    write(&first.overlay, b"small");
    caches.commit(first).unwrap();
    let bigger = caches
        .check_out(
            &key("pip"),
            ByteSize(128 * MIB),
            &tmp.path().join("b.qcow2"),
        )
        .unwrap();
    assert_eq!(bigger.started_on, None);
    assert_eq!(
        bigger.why_empty.as_deref(),
        Some("it was 64MiB, the manifest asks for 128MiB: it starts empty")
    );
    assert_eq!(read(&bigger.overlay, 5), [0; 5]);
    drop(bigger);
    let again = caches
        .check_out(
            &key("pip"),
            ByteSize(128 * MIB),
            &tmp.path().join("b2.qcow2"),
        )
        .unwrap();
    let files = std::fs::read_dir(caches.folder(&key("pip")))
        .unwrap()
        .count();
    assert_eq!(
        files, 5,
        "current, used, the stored version and its base, the new empty disk: not the failed job's"
    );
    drop(again);
    let too_big = caches.check_out(
        &key("pip"),
        ByteSize(17 * 1024 * MIB),
        &tmp.path().join("c.qcow2"),
    );
    assert!(format!("{:#}", too_big.unwrap_err()).contains("at most 16GiB ([caches] max_size)"));
    assert_eq!(caches.held().unwrap().len(), 1);
    assert!(caches.drop_cache(&key("pip")).unwrap());
    assert!(caches.list().unwrap().is_empty());
    assert!(caches.held().unwrap().is_empty(), "nor what was dropped");
    assert!("alice/../x".parse::<CacheKey>().is_err());
}

#[test]
fn test_caches_past_the_total_size_go_oldest_use_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = config(tmp.path());
    config.total_size = ByteSize(MIB);
    let caches = Caches::open_for_worker(&config).unwrap();
    for (i, name) in ["old", "new"].into_iter().enumerate() {
        let job = caches
            .check_out(&key(name), SIZE, &tmp.path().join(format!("{i}.qcow2")))
            .unwrap();
        write(&job.overlay, &vec![7; 768 * 1024]);
        caches.commit(job).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let names: Vec<String> = caches
        .list()
        .unwrap()
        .into_iter()
        .map(|c| c.key.name)
        .collect();
    assert_eq!(names, ["new"]);
}

/// What the child of the kill test commits into, when it is that child.
const KILL_CHILD: &str = "VMFARM_TEST_CACHE_KILL_CHILD";
const KILL_TEST: &str =
    "worker::caches::tests::test_a_worker_killed_during_commits_leaves_a_whole_version";

/// A worker process killed (SIGKILL) at different points of its commits: the store it leaves
/// opens, its newest version is whole and is one a commit made. The child is this test binary,
/// run for this test alone, committing version after version until it is killed.
#[test]
fn test_a_worker_killed_during_commits_leaves_a_whole_version() {
    use std::io::BufRead as _;
    if let Some(dir) = std::env::var_os(KILL_CHILD) {
        let dir = PathBuf::from(dir);
        let caches = store(&dir);
        for i in 0..10_000 {
            let job = caches
                .check_out(
                    &key("pip"),
                    SIZE,
                    &dir.join(format!("job-{}-{i}.qcow2", std::process::id())),
                )
                .unwrap();
            write(&job.overlay, format!("commit {i:06}").as_bytes());
            caches.commit(job).unwrap();
            println!("committed {i}");
        }
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..24u64 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([KILL_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(KILL_CHILD, tmp.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // Killed some way into a commit after its first: each round a little later.
        let committed = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.contains("committed "));
        assert!(committed.is_some(), "the child committed nothing");
        std::thread::sleep(Duration::from_millis(3 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        drop(lines);

        let caches = store(tmp.path());
        let job = caches
            .check_out(
                &key("pip"),
                SIZE,
                &tmp.path().join(format!("check-{round}.qcow2")),
            )
            .unwrap();
        // Each child writes `commit N` (its own count) on a version before it commits it.
        let found = String::from_utf8_lossy(&read(&job.overlay, 13)).into_owned();
        let whole = found
            .strip_prefix("commit ")
            .is_some_and(|n| n.parse::<u64>().is_ok());
        assert!(whole, "round {round}: the newest version holds {found:?}");
        assert!(job.started_on.is_some(), "round {round}: no version left");
        drop(job);
        let folder = caches.folder(&key("pip"));
        let leftovers: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "round {round}: {leftovers:?}");
    }
}
