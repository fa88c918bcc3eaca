/* A batch job that writes its own files: OUT is opened "w" and gets one
 * line per step ("0\n", "1\n", ...), STATE is rewritten in place with the
 * last step done. Before each step the job checks that STATE still holds
 * the previous step: a restore that did not roll STATE back makes it exit 3.
 * Usage: filejob OUT STATE STEPS INTERVAL_MS                              */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: filejob OUT STATE STEPS INTERVAL_MS\n");
		return 2;
	}
	FILE *out = fopen(argv[1], "w");
	int st = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0644);
	long steps = atol(argv[3]), ms = atol(argv[4]);
	if (!out || st < 0) {
		perror("open");
		return 2;
	}
	char buf[32];
	for (long i = 0; i < steps; i++) {
		if (i > 0) {
			memset(buf, 0, sizeof(buf));
			if (pread(st, buf, 9, 0) != 9 || atol(buf) != i - 1) {
				fprintf(stderr, "MISMATCH: state file holds \"%.9s\", expected %ld\n", buf, i - 1);
				return 3;
			}
		}
		fprintf(out, "%ld\n", i);
		fflush(out);
		printf("%ld\n", i);
		fflush(stdout);
		snprintf(buf, sizeof(buf), "%08ld\n", i);
		if (pwrite(st, buf, 9, 0) != 9) {
			perror("pwrite");
			return 2;
		}
		usleep(ms * 1000);
	}
	fclose(out);
	close(st);
	return 0;
}
