/* A process tree: a zombie child (exited 42, not reaped), a child in its own
 * process group, and a child that is a session leader with a grandchild in
 * another group of that session. Ids are checked after the restore. */
#include "matrix.h"

static pid_t z, g, s, sg, me;

static void check(void)
{
	siginfo_t si = { 0 };
	CHECK(waitid(P_PID, z, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == z &&
		      si.si_code == CLD_EXITED && si.si_status == 42, "zombie %d", (int)z);
	CHECK(getsid(0) == me && getpgrp() == me, "root: sid %d pgid %d", (int)getsid(0), (int)getpgrp());
	CHECK(getsid(g) == me && getpgid(g) == g, "group child: sid %d pgid %d", (int)getsid(g), (int)getpgid(g));
	CHECK(getsid(s) == s && getpgid(s) == s, "session child: sid %d pgid %d", (int)getsid(s), (int)getpgid(s));
	CHECK(getsid(sg) == s && getpgid(sg) == sg, "grandchild: sid %d pgid %d", (int)getsid(sg), (int)getpgid(sg));
}

int main(void)
{
	me = getpid();
	CHECK(getsid(0) == me || setsid() == me, "root is not a session leader");
	if ((z = fork()) == 0)
		_exit(42);
	if ((g = fork()) == 0) {
		setpgid(0, 0);
		for (;;)
			pause();
	}
	setpgid(g, g);
	int p[2];
	CHECK(pipe(p) == 0, "pipe");
	if ((s = fork()) == 0) {
		setsid();
		pid_t c = fork();
		if (c == 0) {
			setpgid(0, 0);
			for (;;)
				pause();
		}
		setpgid(c, c);
		if (write(p[1], &c, sizeof c) != sizeof c)
			_exit(1);
		for (;;)
			pause();
	}
	CHECK(read(p[0], &sg, sizeof sg) == sizeof sg, "grandchild pid");
	msleep(20);
	check();
	ready();
	long n = 0;
	while (!step(&n))
		check();
	check();
	int st;
	CHECK(waitpid(z, &st, 0) == z && WIFEXITED(st) && WEXITSTATUS(st) == 42, "reap zombie");
	kill(sg, SIGKILL);
	kill(s, SIGKILL);
	kill(g, SIGKILL);
	CHECK(waitpid(s, NULL, 0) == s && waitpid(g, NULL, 0) == g, "reap children");
	pass();
}
