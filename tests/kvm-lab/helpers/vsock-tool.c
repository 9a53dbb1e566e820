// vsock-tool: moves a checked byte stream both ways over vsock, for the KVM lab tests.
//
// Each side sends BYTES bytes of a deterministic pseudo-random stream and at the same time reads
// BYTES bytes from its peer, checking every byte against the stream the peer must send. The side
// that opened the connection sends stream 1, the side that accepted it sends stream 2.
// Nothing relies on half-close: each side knows how much to expect.
//
//   vsock-tool listen-vsock PORT BYTES            guest: accept one connection on AF_VSOCK PORT
//   vsock-tool connect-vsock CID PORT BYTES       guest: connect to CID:PORT (host = 2)
//   vsock-tool connect-hybrid SOCKET PORT BYTES   host: Unix SOCKET, "CONNECT PORT\n" -> "OK n\n"
//   vsock-tool listen-unix SOCKET BYTES           host: accept one connection on Unix SOCKET
//                                                  (the VMM forwards guest connections to SOCKET)
// Prints "VSOCK-OK ..." and exits 0 when both directions carried BYTES intact, else "VSOCK-FAIL ...".
// Connects are retried for up to VSOCK_TOOL_WAIT seconds (default 30); the whole exchange must end
// within VSOCK_TOOL_TIMEOUT seconds (default 120).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static double env_secs(const char *name, double dflt) {
  const char *v = getenv(name);
  return v && *v ? atof(v) : dflt;
}

// Byte i of stream `seed`: splitmix64 over the 8-byte word index, so any offset is cheap to check.
static uint8_t stream_byte(uint64_t seed, uint64_t i) {
  uint64_t z = (i >> 3) + seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return (uint8_t)(z >> ((i & 7) * 8));
}

static int fail(const char *what) {
  printf("VSOCK-FAIL %s: %s\n", what, strerror(errno));
  fflush(stdout);
  return 1;
}

// Sends `total` bytes of stream `send_seed`, receives and checks `total` bytes of `recv_seed`.
static int exchange(int fd, uint64_t total, uint64_t send_seed, uint64_t recv_seed,
                    const uint8_t *pre, size_t npre, const char *label) {
  double t0 = now(), deadline = t0 + env_secs("VSOCK_TOOL_TIMEOUT", 120);
  uint64_t sent = 0, rcvd = 0, bad_at = UINT64_MAX;
  uint8_t buf[65536];
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  for (size_t k = 0; k < npre && rcvd < total; k++, rcvd++)
    if (pre[k] != stream_byte(recv_seed, rcvd) && bad_at == UINT64_MAX) bad_at = rcvd;
  if (npre > total) {
    printf("VSOCK-FAIL %s: %zu bytes more than expected\n", label, (size_t)(npre - total));
    return 1;
  }
  while (sent < total || rcvd < total) {
    double left = deadline - now();
    if (left <= 0) {
      printf("VSOCK-FAIL %s: timeout with sent=%llu recv=%llu of %llu\n", label,
             (unsigned long long)sent, (unsigned long long)rcvd, (unsigned long long)total);
      return 1;
    }
    struct pollfd p = {.fd = fd, .events = (sent < total ? POLLOUT : 0) | (rcvd < total ? POLLIN : 0)};
    int n = poll(&p, 1, left > 1 ? 1000 : (int)(left * 1000) + 1);
    if (n < 0 && errno != EINTR) return fail("poll");
    if (n <= 0) continue;
    if (rcvd < total && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
      size_t want = total - rcvd < sizeof buf ? (size_t)(total - rcvd) : sizeof buf;
      ssize_t r = read(fd, buf, want);
      if (r == 0) {
        printf("VSOCK-FAIL %s: peer closed after recv=%llu of %llu (sent=%llu)\n", label,
               (unsigned long long)rcvd, (unsigned long long)total, (unsigned long long)sent);
        return 1;
      }
      if (r < 0 && errno != EAGAIN && errno != EINTR) return fail("read");
      for (ssize_t k = 0; k < r; k++, rcvd++)
        if (buf[k] != stream_byte(recv_seed, rcvd) && bad_at == UINT64_MAX) bad_at = rcvd;
    }
    if (sent < total && (p.revents & POLLOUT)) {
      size_t len = total - sent < sizeof buf ? (size_t)(total - sent) : sizeof buf;
      for (size_t k = 0; k < len; k++) buf[k] = stream_byte(send_seed, sent + k);
      ssize_t w = write(fd, buf, len);
      if (w < 0 && errno != EAGAIN && errno != EINTR) return fail("write");
      if (w > 0) sent += (uint64_t)w;
    }
  }
  double secs = now() - t0;
  if (bad_at != UINT64_MAX) {
    printf("VSOCK-FAIL %s: received data differs from byte %llu on\n", label, (unsigned long long)bad_at);
    return 1;
  }
  // The peer sends exactly `total`; anything more is an error (give it a moment to show up).
  struct pollfd p = {.fd = fd, .events = POLLIN};
  if (poll(&p, 1, 200) > 0) {
    ssize_t r = read(fd, buf, sizeof buf);
    if (r > 0) {
      printf("VSOCK-FAIL %s: %zd unexpected bytes after the stream\n", label, r);
      return 1;
    }
  }
  printf("VSOCK-OK %s sent=%llu recv=%llu secs=%.3f MiB/s=%.1f\n", label, (unsigned long long)sent,
         (unsigned long long)rcvd, secs, secs > 0 ? 2.0 * total / secs / 1048576.0 : 0.0);
  fflush(stdout);
  return 0;
}

static int unix_addr(const char *path, struct sockaddr_un *a) {
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  if (strlen(path) >= sizeof a->sun_path) {
    printf("VSOCK-FAIL socket path too long: %s\n", path);
    return -1;
  }
  strcpy(a->sun_path, path);
  return 0;
}

// Host side of the hybrid vsock: "CONNECT <port>\n", then the "OK <n>\n" line; bytes that came in
// the same read after that line already belong to the stream.
static int connect_hybrid(const char *path, unsigned port, uint64_t total) {
  struct sockaddr_un a;
  if (unix_addr(path, &a) < 0) return 1;
  double deadline = now() + env_secs("VSOCK_TOOL_WAIT", 30);
  for (int attempt = 1;; attempt++) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("socket(AF_UNIX)");
    char line[64], got[512];
    size_t ngot = 0;
    const char *why = NULL;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
      why = "connect";
    } else {
      int n = snprintf(line, sizeof line, "CONNECT %u\n", port);
      if (write(fd, line, n) != n) why = "write CONNECT";
      while (!why && !memchr(got, '\n', ngot)) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 10000) <= 0) { why = "no answer to CONNECT"; break; }
        ssize_t r = read(fd, got + ngot, sizeof got - ngot);
        if (r <= 0) { why = "closed before OK"; break; }
        ngot += (size_t)r;
        if (!memchr(got, '\n', ngot) && ngot == sizeof got) {
          printf("VSOCK-FAIL answer to CONNECT has no newline in %zu bytes\n", ngot);
          return 1;
        }
      }
    }
    if (!why) {
      char *nl = memchr(got, '\n', ngot);
      size_t linelen = (size_t)(nl - got);
      if (linelen < 3 || memcmp(got, "OK ", 3) != 0) {
        printf("VSOCK-FAIL bad answer to CONNECT: %.*s\n", (int)linelen, got);
        return 1;
      }
      printf("hybrid: %.*s after %d attempt(s)\n", (int)linelen, got, attempt);
      char label[64];
      snprintf(label, sizeof label, "host->guest:%u", port);
      return exchange(fd, total, 1, 2, (uint8_t *)nl + 1, ngot - linelen - 1, label);
    }
    int e = errno;
    close(fd);
    if (now() > deadline) {
      errno = e;
      return fail(why);
    }
    usleep(200000);
  }
}

static int listen_unix(const char *path, uint64_t total) {
  struct sockaddr_un a;
  if (unix_addr(path, &a) < 0) return 1;
  unlink(path);
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return fail("socket(AF_UNIX)");
  if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) return fail("bind");
  if (listen(s, 1) < 0) return fail("listen");
  printf("listening on %s\n", path);
  fflush(stdout);
  struct pollfd p = {.fd = s, .events = POLLIN};
  if (poll(&p, 1, (int)(env_secs("VSOCK_TOOL_WAIT", 30) * 1000)) <= 0) {
    printf("VSOCK-FAIL no connection on %s\n", path);
    return 1;
  }
  int fd = accept4(s, NULL, NULL, SOCK_CLOEXEC);
  if (fd < 0) return fail("accept");
  return exchange(fd, total, 2, 1, NULL, 0, "guest->host(unix)");
}

static int listen_vsock(unsigned port, uint64_t total) {
  int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return fail("socket(AF_VSOCK)");
  struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_ANY};
  if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) return fail("bind(vsock)");
  if (listen(s, 1) < 0) return fail("listen(vsock)");
  printf("VSOCK-LISTENING port=%u\n", port);
  fflush(stdout);
  struct pollfd p = {.fd = s, .events = POLLIN};
  if (poll(&p, 1, (int)(env_secs("VSOCK_TOOL_WAIT", 30) * 1000)) <= 0) {
    printf("VSOCK-FAIL no connection on vsock port %u\n", port);
    return 1;
  }
  int fd = accept4(s, NULL, NULL, SOCK_CLOEXEC);
  if (fd < 0) return fail("accept(vsock)");
  char label[64];
  snprintf(label, sizeof label, "guest-accepted:%u", port);
  return exchange(fd, total, 2, 1, NULL, 0, label);
}

static int connect_vsock(unsigned cid, unsigned port, uint64_t total) {
  double deadline = now() + env_secs("VSOCK_TOOL_WAIT", 30);
  for (;;) {
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("socket(AF_VSOCK)");
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = cid};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
      char label[64];
      snprintf(label, sizeof label, "guest->host:%u", port);
      return exchange(fd, total, 1, 2, NULL, 0, label);
    }
    int e = errno;
    close(fd);
    if (now() > deadline) {
      errno = e;
      return fail("connect(vsock)");
    }
    usleep(200000);
  }
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  const char *m = argc > 1 ? argv[1] : "";
  if (!strcmp(m, "listen-vsock") && argc == 4) return listen_vsock(atoi(argv[2]), strtoull(argv[3], 0, 0));
  if (!strcmp(m, "connect-vsock") && argc == 5)
    return connect_vsock(atoi(argv[2]), atoi(argv[3]), strtoull(argv[4], 0, 0));
  if (!strcmp(m, "connect-hybrid") && argc == 5)
    return connect_hybrid(argv[2], atoi(argv[3]), strtoull(argv[4], 0, 0));
  if (!strcmp(m, "listen-unix") && argc == 4) return listen_unix(argv[2], strtoull(argv[3], 0, 0));
  fprintf(stderr,
          "usage: vsock-tool listen-vsock PORT BYTES | connect-vsock CID PORT BYTES |\n"
          "                  connect-hybrid SOCKET PORT BYTES | listen-unix SOCKET BYTES\n");
  return 2;
}
