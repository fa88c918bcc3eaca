/* Holds MB megabytes of incompressible memory and rewrites PAGES random
 * pages every INTERVAL_MS milliseconds, printing a counter each time.
 * Usage: dirty MB PAGES [INTERVAL_MS] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static uint64_t x = 88172645463325252ull;

static inline uint64_t rnd(void)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
	long pages = argc > 2 ? strtol(argv[2], NULL, 10) : 4;
	long ms = argc > 3 ? strtol(argv[3], NULL, 10) : 100;
	size_t n = mb << 20, np = n / 4096;
	uint64_t *p = aligned_alloc(4096, n);
	if (!p)
		return 1;
	for (size_t i = 0; i < n / 8; i++)
		p[i] = rnd();
	for (long i = 0;; i++) {
		for (long k = 0; k < pages; k++) {
			uint64_t *q = p + (rnd() % np) * 512;
			for (int j = 0; j < 512; j++)
				q[j] = rnd();
		}
		printf("%ld\n", i);
		fflush(stdout);
		usleep(ms * 1000);
	}
}
