/* A job holding a write lease (fcntl F_SETLEASE, F_WRLCK) on a file it
 * created: prints 0, 1, ... to stdout, one number every INTERVAL_MS, and
 * writes the same number into FILE (pwrite at offset 0). After each step it
 * checks that it still holds the lease (F_GETLEASE) and that no SIGIO (the
 * kernel's lease-break notice) arrived; otherwise it exits 4 (SIGIO) or 5
 * (lease gone) with a message on stderr. Exits 0 after STEPS steps.
 * Usage: lease FILE STEPS INTERVAL_MS                                     */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t sigio;

static void on_sigio(int sig)
{
	(void)sig;
	sigio = 1;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: lease FILE STEPS INTERVAL_MS\n");
		return 2;
	}
	long steps = atol(argv[2]), ms = atol(argv[3]);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigio;
	sigaction(SIGIO, &sa, NULL);
	int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) {
		perror("open");
		return 2;
	}
	if (fcntl(fd, F_SETLEASE, F_WRLCK) != 0) {
		perror("F_SETLEASE");
		return 2;
	}
	char buf[32];
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	for (long i = 0; i < steps; i++) {
		int n = snprintf(buf, sizeof(buf), "%08ld\n", i);
		if (pwrite(fd, buf, n, 0) != n) {
			perror("pwrite");
			return 2;
		}
		printf("%ld\n", i);
		fflush(stdout);
		nanosleep(&ts, NULL);
		if (sigio) {
			fprintf(stderr, "SIGIO: the lease is being broken (step %ld)\n", i);
			return 4;
		}
		int l = fcntl(fd, F_GETLEASE);
		if (l != F_WRLCK) {
			fprintf(stderr, "LEASE GONE: F_GETLEASE = %d (step %ld)\n", l, i);
			return 5;
		}
	}
	return 0;
}
