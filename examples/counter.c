/* The seed scenario's program: prints 0, 1, 2, ... one number per interval.
 * Usage: counter [interval_ms]   (default 1000, as in the CRIU how-to) */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long ms = argc > 1 ? atol(argv[1]) : 1000;
	for (long i = 0;; i++) {
		printf("%ld\n", i);
		fflush(stdout);
		usleep(ms * 1000);
	}
	return 0;
}
