/* A pipe and a FIFO with data in flight (written, not yet read). */
#include "matrix.h"
#include <sys/ioctl.h>

static char msg[3000];

static void check(int rd, int fifo, const char *final)
{
	int q = -1, f = -1;
	CHECK(ioctl(rd, FIONREAD, &q) == 0 && q == 3000, "pipe holds %d bytes, not 3000", q);
	CHECK(ioctl(fifo, FIONREAD, &f) == 0 && f == 1000, "FIFO holds %d bytes, not 1000", f);
	if (!final)
		return;
	char got[3000];
	CHECK(read(rd, got, 3000) == 3000 && memcmp(got, msg, 3000) == 0, "pipe data differs");
	CHECK(read(fifo, got, 1000) == 1000 && memcmp(got, msg + 7, 1000) == 0, "FIFO data differs");
}

int main(void)
{
	for (int i = 0; i < 3000; i++)
		msg[i] = (char)('a' + i % 23);
	int p[2];
	CHECK(pipe(p) == 0 && write(p[1], msg, 3000) == 3000, "pipe");
	unlink("fifo");
	CHECK(mkfifo("fifo", 0600) == 0, "mkfifo");
	int fifo = open("fifo", O_RDWR);
	CHECK(fifo >= 0 && write(fifo, msg + 7, 1000) == 1000, "fifo");
	check(p[0], fifo, NULL);
	ready();
	long n = 0;
	while (!step(&n))
		check(p[0], fifo, NULL);
	check(p[0], fifo, "final");
	/* Both still work as pipes. */
	char c;
	CHECK(write(p[1], "x", 1) == 1 && read(p[0], &c, 1) == 1 && c == 'x', "pipe after restore");
	CHECK(write(fifo, "y", 1) == 1 && read(fifo, &c, 1) == 1 && c == 'y', "FIFO after restore");
	pass();
}
