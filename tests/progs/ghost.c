/* An unlinked-but-open file (a CRIU "ghost file"): creates FILE, writes
 * SIZE bytes of a known pattern, unlinks it and keeps it open; then, every
 * MS milliseconds, prints a counter on stdout and checks the whole content
 * through the descriptor (and that it is still unlinked). A mismatch prints
 * "MISMATCH ..." on stderr and exits 1.
 *
 *   ghost FILE SIZE MS
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static unsigned char pattern(long i) { return (unsigned char)((i * 31 + 7) ^ (i >> 12)); }

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: ghost FILE SIZE MS\n");
		return 2;
	}
	long size = atol(argv[2]);
	long ms = atol(argv[3]);
	int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0) {
		perror("open");
		return 2;
	}
	unsigned char *buf = malloc(size);
	if (!buf)
		return 2;
	for (long i = 0; i < size; i++)
		buf[i] = pattern(i);
	if (pwrite(fd, buf, size, 0) != size) {
		perror("pwrite");
		return 2;
	}
	if (unlink(argv[1])) {
		perror("unlink");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (long n = 0;; n++) {
		struct stat st;
		if (fstat(fd, &st) || st.st_nlink != 0 || st.st_size != size) {
			fprintf(stderr, "MISMATCH at %ld: nlink %ld size %ld\n", n,
				(long)st.st_nlink, (long)st.st_size);
			return 1;
		}
		if (pread(fd, buf, size, 0) != size) {
			fprintf(stderr, "MISMATCH at %ld: short read\n", n);
			return 1;
		}
		for (long i = 0; i < size; i++) {
			if (buf[i] != pattern(i)) {
				fprintf(stderr, "MISMATCH at %ld: byte %ld\n", n, i);
				return 1;
			}
		}
		printf("%ld\n", n);
		usleep(ms * 1000);
	}
}
