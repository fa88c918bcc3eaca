/* Holds a marker string in memory: "SUPERVISE-SECRET-<n>" with
 * n = SEED * SEED * 7919 + 104729, built at run time (so the marker is in
 * no file, not even this binary), copied into every 512 bytes of MB MiB of
 * otherwise random (incompressible) memory, and prints a counter every
 * INTERVAL_MS milliseconds.
 * Usage: secret SEED [MB] [INTERVAL_MS] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	unsigned long long seed = argc > 1 ? strtoull(argv[1], NULL, 10) : 1;
	size_t mb = argc > 2 ? strtoul(argv[2], NULL, 10) : 4;
	long ms = argc > 3 ? strtol(argv[3], NULL, 10) : 1000;
	char marker[64];
	int len = snprintf(marker, sizeof marker, "SUPERVISE-SECRET-%llu",
			   seed * seed * 7919ull + 104729ull);
	size_t n = mb << 20;
	unsigned char *p = malloc(n);
	if (!p)
		return 1;
	uint64_t x = 88172645463325252ull ^ seed;
	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p[i] = (unsigned char)x;
	}
	for (size_t i = 0; i + (size_t)len <= n; i += 512)
		memcpy(p + i, marker, len);
	memset(marker, 0, sizeof marker);
	volatile unsigned char sink;
	for (long i = 0;; i++) {
		sink = p[((size_t)i * 4096) % n]; /* keep the memory alive */
		(void)sink;
		printf("%ld\n", i);
		fflush(stdout);
		usleep(ms * 1000);
	}
	return 0;
}
