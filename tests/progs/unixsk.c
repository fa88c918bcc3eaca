/* Unix stream and datagram socketpairs with queued data. */
#include "matrix.h"
#include <sys/ioctl.h>
#include <sys/socket.h>

static const int dg[3] = { 10, 300, 1 };

int main(void)
{
	int s[2], d[2];
	char buf[4096], want[4096];
	for (int i = 0; i < 4096; i++)
		want[i] = (char)(i % 251);
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, s) == 0, "stream socketpair");
	CHECK(socketpair(AF_UNIX, SOCK_DGRAM, 0, d) == 0, "dgram socketpair");
	CHECK(send(s[0], want, 2000, 0) == 2000, "send stream");
	for (int i = 0; i < 3; i++)
		CHECK(send(d[0], want + i, dg[i], 0) == dg[i], "send dgram");
	ready();
	long n = 0;
	int done;
	do {
		int q = -1;
		CHECK(ioctl(s[1], FIONREAD, &q) == 0 && q == 2000, "stream queue %d, not 2000", q);
		CHECK(ioctl(d[1], FIONREAD, &q) == 0 && q == dg[0], "first datagram %d, not %d", q, dg[0]);
		done = step(&n);
	} while (!done);
	CHECK(recv(s[1], buf, sizeof buf, MSG_DONTWAIT) == 2000 && memcmp(buf, want, 2000) == 0,
	      "stream data differs");
	for (int i = 0; i < 3; i++) {
		ssize_t r = recv(d[1], buf, sizeof buf, MSG_DONTWAIT);
		CHECK(r == dg[i] && memcmp(buf, want + i, dg[i]) == 0, "datagram %d: %zd bytes", i, r);
	}
	CHECK(recv(d[1], buf, sizeof buf, MSG_DONTWAIT) < 0 && errno == EAGAIN, "extra datagram");
	/* Still connected, both ways. */
	CHECK(send(s[1], "ab", 2, 0) == 2 && recv(s[0], buf, 2, 0) == 2 && buf[1] == 'b', "stream after restore");
	CHECK(send(d[1], "abc", 3, 0) == 3 && recv(d[0], buf, 9, 0) == 3, "dgram after restore");
	pass();
}
