/* eventfd, signalfd, epoll and inotify (timerfd: timerfd.c). */
#include "matrix.h"
#include <poll.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>

int main(void)
{
	int ev = eventfd(0, EFD_NONBLOCK);
	uint64_t v = 5;
	CHECK(ev >= 0 && write(ev, &v, 8) == 8, "eventfd");
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	int sfd = signalfd(-1, &set, SFD_NONBLOCK);
	CHECK(sfd >= 0 && raise(SIGUSR1) == 0, "signalfd");
	int ep = epoll_create1(0);
	struct epoll_event ee = { .events = EPOLLIN, .data.u64 = 0xE1 };
	CHECK(ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, ev, &ee) == 0, "epoll");
	int in = inotify_init1(IN_NONBLOCK);
	CHECK(in >= 0 && inotify_add_watch(in, ".", IN_CREATE) >= 0, "inotify");
	ready();
	long n = 0;
	int done;
	do {
		CHECK(read(ev, &v, 8) == 8 && v == 5, "eventfd count %llu", (unsigned long long)v);
		struct epoll_event got;
		CHECK(epoll_wait(ep, &got, 1, 0) == 0, "epoll reports the empty eventfd");
		v = 5;
		CHECK(write(ev, &v, 8) == 8, "eventfd write");
		CHECK(epoll_wait(ep, &got, 1, 0) == 1 && got.data.u64 == 0xE1, "epoll lost the eventfd");
		struct pollfd p = { .fd = sfd, .events = POLLIN };
		CHECK(poll(&p, 1, 0) == 1, "signalfd not readable");
		done = step(&n);
	} while (!done);
	struct signalfd_siginfo si;
	CHECK(read(sfd, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR1, "signalfd read");
	char buf[4096] __attribute__((aligned(8)));
	int go = 0;
	ssize_t len = read(in, buf, sizeof buf);
	for (char *p = buf; len > 0 && p < buf + len;) {
		struct inotify_event *e = (struct inotify_event *)p;
		go |= e->len && strcmp(e->name, "go") == 0;
		p += sizeof *e + e->len;
	}
	CHECK(go, "inotify: no IN_CREATE event for go");
	pass();
}
