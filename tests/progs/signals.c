/* Pending signals (blocked; one thread-directed, queued real-time ones
 * with values) and an alternate signal stack. */
#include "matrix.h"

static char alt[65536];
static volatile int on_alt;
static void on_usr2(int s)
{
	char here;
	(void)s;
	on_alt = &here > alt && &here < alt + sizeof alt;
}

int main(void)
{
	sigset_t block, pend;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGUSR2);
	sigaddset(&block, SIGRTMIN + 1);
	sigprocmask(SIG_BLOCK, &block, NULL);
	CHECK(raise(SIGUSR1) == 0, "raise");
	for (int v = 7; v <= 8; v++)
		CHECK(sigqueue(getpid(), SIGRTMIN + 1, (union sigval){ .sival_int = v }) == 0, "sigqueue");
	stack_t ss = { .ss_sp = alt, .ss_size = sizeof alt }, cur;
	CHECK(sigaltstack(&ss, NULL) == 0, "sigaltstack");
	struct sigaction sa = { .sa_handler = on_usr2, .sa_flags = SA_ONSTACK };
	sigaction(SIGUSR2, &sa, NULL);
	ready();
	long n = 0;
	int done;
	do {
		CHECK(sigpending(&pend) == 0 && sigismember(&pend, SIGUSR1) && sigismember(&pend, SIGRTMIN + 1),
		      "pending signals lost");
		CHECK(!sigismember(&pend, SIGUSR2), "SIGUSR2 pending");
		CHECK(sigaltstack(NULL, &cur) == 0 && cur.ss_sp == alt && cur.ss_size == sizeof alt,
		      "sigaltstack changed");
		done = step(&n);
	} while (!done);
	siginfo_t si;
	struct timespec zero = { 0, 0 };
	CHECK(sigtimedwait(&block, &si, &zero) == SIGUSR1, "SIGUSR1 first");
	for (int v = 7; v <= 8; v++)
		CHECK(sigtimedwait(&block, &si, &zero) == SIGRTMIN + 1 && si.si_value.sival_int == v,
		      "queued SIGRTMIN+1 with value %d", v);
	CHECK(sigtimedwait(&block, &si, &zero) < 0, "extra signal %d pending", si.si_signo);
	raise(SIGUSR2);
	sigprocmask(SIG_UNBLOCK, &block, NULL);
	CHECK(on_alt, "SIGUSR2 handler not run on the alternate stack");
	pass();
}
