/* POSIX (fcntl) record lock, OFD lock and flock, each checked from a
 * different open file description (POSIX: from a child process). */
#include "matrix.h"
#include <sys/file.h>

static struct flock range(short type, off_t start)
{
	struct flock l = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = 10 };
	return l;
}

/* In a child: closing an fd of locks.dat would drop our POSIX lock. */
static int child_check(pid_t owner)
{
	int fd = open("locks.dat", O_RDWR);
	if (fd < 0)
		return 1;
	struct flock l = range(F_WRLCK, 0);
	if (fcntl(fd, F_GETLK, &l) != 0 || l.l_type != F_WRLCK || l.l_pid != owner)
		return 2;
	l = range(F_WRLCK, 20);
	if (fcntl(fd, F_OFD_GETLK, &l) != 0 || l.l_type != F_WRLCK)
		return 3;
	l = range(F_WRLCK, 40);
	if (fcntl(fd, F_OFD_GETLK, &l) != 0 || l.l_type != F_UNLCK)
		return 4;
	return 0;
}

static void check(void)
{
	int fd = open("flock.dat", O_RDWR);
	CHECK(fd >= 0, "open flock.dat");
	CHECK(flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK, "flock gone");
	close(fd);
	pid_t me = getpid(), c = fork();
	if (c == 0)
		_exit(child_check(me));
	int st;
	CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st), "child");
	CHECK(WEXITSTATUS(st) != 1, "open locks.dat");
	CHECK(WEXITSTATUS(st) != 2, "POSIX lock on 0..9 not held by %d", (int)me);
	CHECK(WEXITSTATUS(st) != 3, "OFD lock on 20..29 gone");
	CHECK(WEXITSTATUS(st) != 4, "unexpected lock on 40..49");
}

int main(void)
{
	int posix = open("locks.dat", O_RDWR | O_CREAT | O_TRUNC, 0600);
	int ofd = open("locks.dat", O_RDWR);
	int fl = open("flock.dat", O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(posix >= 0 && ofd >= 0 && fl >= 0, "open");
	struct flock l = range(F_WRLCK, 0);
	CHECK(fcntl(posix, F_SETLK, &l) == 0, "F_SETLK");
	l = range(F_WRLCK, 20);
	CHECK(fcntl(ofd, F_OFD_SETLK, &l) == 0, "F_OFD_SETLK");
	CHECK(flock(fl, LOCK_EX) == 0, "flock");
	check();
	ready();
	long n = 0;
	while (!step(&n))
		check();
	check();
	pass();
}
