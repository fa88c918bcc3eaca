/* Prints a counter every 100 ms holding 1 MiB; once the file TRIGGER
 * exists it grows by MB megabytes of dirty memory and creates TRIGGER.done.
 * Usage: grow MB TRIGGER */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void touch(unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i += 4096)
		p[i] = (unsigned char)(i >> 12) | 1;
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
	const char *trigger = argc > 2 ? argv[2] : "grow.trigger";
	char done[4096];
	snprintf(done, sizeof done, "%s.done", trigger);
	unsigned char *small = malloc(1 << 20), *big = NULL;
	touch(small, 1 << 20);
	for (long i = 0;; i++) {
		if (!big && access(trigger, F_OK) == 0) {
			big = malloc(mb << 20);
			touch(big, mb << 20);
			FILE *f = fopen(done, "w");
			if (f)
				fclose(f);
		}
		if (big)
			big[(i * 4096) % (mb << 20)]++;
		printf("%ld\n", i);
		fflush(stdout);
		usleep(100000);
	}
}
