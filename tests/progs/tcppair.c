/* A parent and its child talking over loopback TCP, with the listener
 * left open: each step the parent sends n, the child answers n + 1. Both
 * ends of the connection are in the job's tree, so supervise checkpoints
 * it as established without any key in the job file. */
#include "matrix.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

static int full(int fd, void *buf, size_t len, int rd)
{
	char *p = buf;
	while (len > 0) {
		ssize_t r = rd ? read(fd, p, len) : write(fd, p, len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

static void child(int port)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	CHECK(s >= 0 && connect(s, (struct sockaddr *)&a, sizeof(a)) == 0, "child: connect");
	long v;
	while (full(s, &v, sizeof(v), 1) == 0) {
		v += 1;
		if (full(s, &v, sizeof(v), 0) != 0)
			break;
	}
	exit(0); /* the parent closed its end */
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN);
	int l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t al = sizeof(a);
	CHECK(l >= 0 && bind(l, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(l, 4) == 0,
	      "listen");
	CHECK(getsockname(l, (struct sockaddr *)&a, &al) == 0, "getsockname");
	pid_t pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		close(l);
		child(ntohs(a.sin_port));
	}
	int c = accept(l, NULL, NULL);
	CHECK(c >= 0, "accept");
	ready();
	long n = 0, v;
	for (;;) {
		v = n;
		CHECK(full(c, &v, sizeof(v), 0) == 0, "send %ld", n);
		CHECK(full(c, &v, sizeof(v), 1) == 0, "no answer to %ld", n);
		CHECK(v == n + 1, "answer %ld to %ld", v, n);
		if (step(&n))
			break;
	}
	/* The listener still listens. */
	int t = socket(AF_INET, SOCK_STREAM, 0);
	CHECK(t >= 0 && connect(t, (struct sockaddr *)&a, sizeof(a)) == 0, "listener after restore");
	close(t);
	close(c);
	int st;
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child ended badly");
	pass();
}
