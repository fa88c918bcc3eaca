/* Holds MB megabytes of dirty memory and prints a counter every 100 ms.
 * Usage: bigmem MB */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
	size_t n = mb << 20;
	unsigned char *p = malloc(n);
	for (size_t i = 0; i < n; i += 4096)
		p[i] = (unsigned char)(i >> 12) | 1;
	for (long i = 0;; i++) {
		p[(i * 4096) % n]++;
		printf("%ld\n", i);
		fflush(stdout);
		usleep(100000);
	}
}
