// tsc-khz: prints the host's TSC rate in kHz, measured against CLOCK_MONOTONIC over 200 ms.
// QEMU TCG hands the host's TSC to L1; telling L1 its true rate (tsc_early_khz=, tsc=reliable) gives
// L1 a TSC clocksource that keeps wall-clock time, where refined-jiffies falls behind under load.
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(void) {
  double t0 = now(), t1;
  unsigned long long c0 = __rdtsc(), c1;
  while ((t1 = now()) - t0 < 0.2) {
  }
  c1 = __rdtsc();
  printf("%.0f\n", (double)(c1 - c0) / (t1 - t0) / 1e3);
  return 0;
}
