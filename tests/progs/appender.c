/* A job that appends one numbered line to OUT every INTERVAL_MS. It opens
 * OUT with O_NOFOLLOW (retrying while a symlink is in the way), as a job
 * living in a directory other users control must, so that a fresh start
 * never writes through an attacker's symlink: whatever changes outside OUT
 * is then the supervisor's doing.
 * Usage: appender OUT INTERVAL_MS                                          */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: appender OUT INTERVAL_MS\n");
		return 2;
	}
	int fd = -1;
	for (int i = 0; i < 100000 && fd < 0; i++) {
		fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
		if (fd < 0 && errno != ELOOP) {
			perror("open");
			return 2;
		}
	}
	if (fd < 0) {
		perror("open");
		return 2;
	}
	long ms = atol(argv[2]);
	char buf[32];
	for (long i = 0;; i++) {
		int n = snprintf(buf, sizeof(buf), "%ld\n", i);
		if (write(fd, buf, n) != n) {
			perror("write");
			return 2;
		}
		usleep(ms * 1000);
	}
}
