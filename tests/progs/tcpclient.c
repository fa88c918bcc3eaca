/* A TCP client of a server outside the job (the test's listener, port in
 * the file "port"): writes a line per step. Checkpointed with
 * tcp_established, killed, restored with tcp_close: its connection comes
 * back closed (the kernel reset it when the job died), the next write
 * fails, and it reconnects once and goes on. */
#include "matrix.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

static int port;

static int dial(void)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	CHECK(s >= 0 && connect(s, (struct sockaddr *)&a, sizeof(a)) == 0, "connect to %d", port);
	return s;
}

int main(void)
{
	FILE *f = fopen("port", "r");
	CHECK(f && fscanf(f, "%d", &port) == 1, "read the port file");
	fclose(f);
	signal(SIGPIPE, SIG_IGN);
	int s = dial(), reconnects = 0;
	ready();
	long n = 0;
	for (;;) {
		char line[64];
		int len = snprintf(line, sizeof(line), "step %ld\n", n);
		if (write(s, line, len) != len) {
			close(s);
			s = dial();
			reconnects++;
			printf("RECONNECTED\n");
			fflush(stdout);
			CHECK(write(s, line, len) == len, "write after reconnecting");
		}
		if (step(&n))
			break;
	}
	CHECK(reconnects == 1, "reconnected %d times", reconnects);
	pass();
}
