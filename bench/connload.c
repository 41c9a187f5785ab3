/* connload: SOCKS5 CONNECT load generator and TCP target server for socksd's benchmarks (loopback).
 *
 *   connload serve --echo PORT --sink PORT --source PORT [--max-seconds S]
 *       Target server on 127.0.0.1 (and ::1 when available), one thread, epoll: echo (every
 *       byte read is written back), sink (reads and discards: upload target), source (writes
 *       128 KiB chunks as fast as the peer reads: download target). Exits on SIGTERM or after S.
 *   connload connrate|bulk|idle -p HOST:PORT -T HOST:PORT [options]    (--help for the list)
 *       connrate  C clients, each looping: connect, no-auth greeting, CONNECT to the target,
 *                 32 bytes echoed, close. Sessions/s in the window after the warm-up, errors,
 *                 p50/p90/p99 latency of the whole sequence.
 *       bulk      C sessions to the sink (--dir up) or the source (--dir down), 128 KiB writes
 *                 or reads: MB/s (1e6 bytes) between the window's edges.
 *       idle      C sessions opened (at most --inflight handshaking at a time), each after one
 *                 echo; prints "READY established=N errors=E", holds them until stdin ends or
 *                 the hold limit (-d) passes, then closes them all.
 *       --direct  no proxy: the same loop straight to the target (the loopback baseline).
 *   The target's form picks the SOCKS address type: 127.0.0.1:P IPv4, [::1]:P IPv6, localhost:P
 *   a domain name. --src-ips N spreads the client's source over 127.0.0.1..127.0.0.N.
 *   Prints one JSON object on stdout and a summary line on stderr.
 *
 * Loopback addresses only. Every run is bounded: warm-up + duration (idle: the hold limit), and
 * each handshake by --timeout. The workloads are those of the workplace's reference harness
 * (socksload), so the figures compare; this file is the project's own copy, single-threaded.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define CHUNK 131072
#define MSG 32

enum { M_CONNRATE = 1, M_BULK, M_IDLE };
enum { S_FREE, S_CONNECTING, S_GREET, S_METHOD, S_REQ, S_REPLY, S_REPLY_REST, S_MSG, S_ECHO,
       S_BULK, S_IDLE, S_BACKOFF, S_DONE };
enum { E_CONNECT, E_ADDR, E_METHOD, E_SOCKS, E_EOF, E_TIMEOUT, E_IO, E_DATA, E_DROPPED, E_N };
static const char *err_names[E_N] = {"connect", "addr_unavail", "method", "socks_reply", "eof",
                                     "timeout", "io", "bad_echo", "dropped"};

typedef struct {
    int fd, state;
    uint32_t off, need;
    uint64_t t0, deadline;
    unsigned char rbuf[300], mbuf[MSG];
} conn_t;

static int g_mode, g_direct, g_conc = 1, g_inflight = 64, g_src_ips = 1, g_dir_up = 1;
static double g_duration = 5.0, g_warmup = 0.5, g_timeout = 5.0;
static struct sockaddr_storage g_proxy, g_target;
static socklen_t g_proxy_len, g_target_len;
static unsigned char g_req[300], g_msg[MSG];
static size_t g_req_len;
static uint64_t g_w0, g_w1, g_src_next;
static conn_t *g_c;
static int g_ep;
static uint64_t g_ok_total, g_ok_window, g_err[E_N], g_bytes;
static int g_established, g_active, g_finished;
static uint32_t *g_lat;
static size_t g_nlat, g_caplat;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *m) {
    fprintf(stderr, "connload: %s\n", m);
    exit(2);
}

/* HOST:PORT or [V6]:PORT into host (a literal or a name) and port; -1 if malformed. */
static int split_hostport(const char *s, char *host, size_t size, int *port) {
    const char *colon, *start = s;
    size_t len;
    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        if (!rb || rb[1] != ':') return -1;
        start = s + 1;
        len = (size_t)(rb - start);
        colon = rb + 1;
    } else {
        if (!(colon = strrchr(s, ':'))) return -1;
        len = (size_t)(colon - s);
    }
    if (len >= size) return -1;
    memcpy(host, start, len);
    host[len] = 0;
    *port = atoi(colon + 1);
    return *port > 0 && *port < 65536 ? 0 : -1;
}

/* Resolves host:port into ss; refuses anything but a loopback address. */
static void resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    if (getaddrinfo(host, ps, &hints, &res) != 0 || !res) die("cannot resolve an address");
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    if (ss->ss_family == AF_INET) {
        if (ntohl(((struct sockaddr_in *)ss)->sin_addr.s_addr) >> 24 != 127) die("not loopback");
    } else if (ss->ss_family != AF_INET6 || !IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)ss)->sin6_addr)) {
        die("not loopback");
    }
}

/* The CONNECT request for host:port: ATYP from the host's form. */
static void build_request(const char *host, int port) {
    unsigned char *p = g_req;
    struct in_addr a4;
    struct in6_addr a6;
    *p++ = 5, *p++ = 1, *p++ = 0;
    if (inet_pton(AF_INET, host, &a4) == 1) {
        *p++ = 1, memcpy(p, &a4, 4), p += 4;
    } else if (inet_pton(AF_INET6, host, &a6) == 1) {
        *p++ = 4, memcpy(p, &a6, 16), p += 16;
    } else {
        size_t l = strlen(host);
        if (l > 255) die("domain too long");
        *p++ = 3, *p++ = (unsigned char)l, memcpy(p, host, l), p += l;
    }
    *p++ = (unsigned char)(port >> 8), *p++ = (unsigned char)(port & 0xff);
    g_req_len = (size_t)(p - g_req);
}

static void lat_push(uint64_t ns) {
    if (g_nlat == g_caplat) {
        size_t cap = g_caplat ? g_caplat * 2 : 65536;
        uint32_t *n = realloc(g_lat, cap * sizeof *n);
        if (!n) return;
        g_lat = n, g_caplat = cap;
    }
    g_lat[g_nlat++] = ns > 0xffffffffULL ? 0xffffffffU : (uint32_t)ns;
}

static void conn_close(conn_t *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

static void conn_fail(conn_t *c, int kind, uint64_t now) {
    g_err[kind]++;
    conn_close(c);
    if (g_mode == M_CONNRATE) {  /* a short back-off: a dead proxy is no busy loop */
        c->state = S_BACKOFF;
        c->deadline = now + 2000000ULL;
        return;
    }
    c->state = S_DONE;
    if (g_mode == M_IDLE) g_active--, g_finished++;
}

static void advance(conn_t *c, uint32_t ev);

static void conn_start(conn_t *c, uint64_t now) {
    const struct sockaddr_storage *dst = g_direct ? &g_target : &g_proxy;
    socklen_t dlen = g_direct ? g_target_len : g_proxy_len;
    int one = 1, fd = socket(dst->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->t0 = now;
    c->deadline = now + (uint64_t)(g_timeout * 1e9);
    c->off = 0;
    c->fd = fd;
    if (fd < 0) {
        conn_fail(c, E_IO, now);
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (g_src_ips > 1 && dst->ss_family == AF_INET) {
        struct sockaddr_in sa = {.sin_family = AF_INET};
        sa.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(g_src_next++ % (uint64_t)g_src_ips));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            conn_fail(c, E_ADDR, now);
            return;
        }
    }
    struct epoll_event e = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    epoll_ctl(g_ep, EPOLL_CTL_ADD, fd, &e);
    int rc = connect(fd, (const struct sockaddr *)dst, dlen);
    if (rc < 0 && errno != EINPROGRESS) {
        conn_fail(c, errno == EADDRNOTAVAIL ? E_ADDR : E_CONNECT, now);
        return;
    }
    c->state = S_CONNECTING;
    if (rc == 0) advance(c, EPOLLOUT);
}

/* 1 done, 0 would block, -1 error, -2 EOF (reads) */
static int do_io(conn_t *c, unsigned char *buf, size_t len, int writing) {
    while (c->off < len) {
        ssize_t n = writing ? send(c->fd, buf + c->off, len - c->off, MSG_NOSIGNAL)
                            : recv(c->fd, buf + c->off, len - c->off, 0);
        if (n == 0 && !writing) return -2;
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno == EAGAIN ? 0 : -1;
        }
        c->off += (uint32_t)n;
    }
    c->off = 0;
    return 1;
}

static void data_phase(conn_t *c) {
    if (g_mode != M_BULK) {
        c->state = S_MSG;
        return;
    }
    c->state = S_BULK;
    g_established++;
    struct epoll_event e = {.events = (g_dir_up ? EPOLLOUT : EPOLLIN) | EPOLLRDHUP, .data.ptr = c};
    epoll_ctl(g_ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void session_done(conn_t *c) {
    uint64_t now = now_ns();
    g_ok_total++;
    if (g_mode == M_CONNRATE) {
        if (now >= g_w0 && now <= g_w1) g_ok_window++, lat_push(now - c->t0);
        conn_close(c);
        if (now < g_w1) conn_start(c, now);
        else c->state = S_DONE;
        return;
    }
    g_established++, g_active--, g_finished++;
    c->state = S_IDLE;
    lat_push(now - c->t0);
}

/* Steps of one session's handshake, as far as the socket allows. */
static void advance(conn_t *c, uint32_t ev) {
    static const unsigned char greet[3] = {5, 1, 0};
    int r;
    for (;;) {
        switch (c->state) {
        case S_CONNECTING: {
            int err = 0;
            socklen_t l = sizeof err;
            if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err) { conn_fail(c, err == EADDRNOTAVAIL ? E_ADDR : E_CONNECT, now_ns()); return; }
            if (g_direct) {
                data_phase(c);
                if (c->state == S_BULK) return;
            } else {
                c->state = S_GREET;
            }
            break;
        }
        case S_GREET:
        case S_REQ:
        case S_MSG:
            r = c->state == S_GREET ? do_io(c, (unsigned char *)greet, 3, 1)
                : c->state == S_REQ ? do_io(c, g_req, g_req_len, 1) : do_io(c, g_msg, MSG, 1);
            if (r == 0) return;
            if (r < 0) { conn_fail(c, E_IO, now_ns()); return; }
            c->state = c->state == S_GREET ? S_METHOD : c->state == S_REQ ? S_REPLY : S_ECHO;
            break;
        case S_METHOD:
        case S_REPLY:
        case S_REPLY_REST:
        case S_ECHO: {
            unsigned char *buf = c->state == S_ECHO ? c->mbuf
                                 : c->state == S_REPLY_REST ? c->rbuf + 5 : c->rbuf;
            size_t need = c->state == S_METHOD ? 2 : c->state == S_REPLY ? 5
                          : c->state == S_REPLY_REST ? c->need : MSG;
            r = do_io(c, buf, need, 0);
            if (r == 0) return;
            if (r < 0) { conn_fail(c, r == -2 ? E_EOF : E_IO, now_ns()); return; }
            if (c->state == S_METHOD) {
                if (c->rbuf[0] != 5 || c->rbuf[1] != 0) { conn_fail(c, E_METHOD, now_ns()); return; }
                c->state = S_REQ;
            } else if (c->state == S_REPLY) {
                if (c->rbuf[0] != 5 || c->rbuf[1] != 0) { conn_fail(c, E_SOCKS, now_ns()); return; }
                /* 5 bytes read: VER REP RSV ATYP and the first address byte */
                c->need = c->rbuf[3] == 1 ? 5 : c->rbuf[3] == 4 ? 17 : c->rbuf[3] == 3 ? c->rbuf[4] + 2u : 0;
                if (!c->need) { conn_fail(c, E_SOCKS, now_ns()); return; }
                c->state = S_REPLY_REST;
            } else if (c->state == S_REPLY_REST) {
                data_phase(c);
                if (c->state == S_BULK) return;
            } else {
                if (memcmp(c->mbuf, g_msg, MSG) != 0) { conn_fail(c, E_DATA, now_ns()); return; }
                { session_done(c); return; }
            }
            break;
        }
        case S_IDLE:  /* any event on an idle session: the proxy dropped it */
            if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                g_err[E_DROPPED]++, g_established--;
                conn_close(c);
                c->state = S_DONE;
            }
            return;
        default:
            return;
        }
    }
}

static void bulk_event(conn_t *c, uint32_t ev, unsigned char *buf) {
    ssize_t n;
    if (g_dir_up) {
        if (ev & (EPOLLERR | EPOLLHUP)) goto dead;
        n = send(c->fd, buf, CHUNK, MSG_NOSIGNAL);
        if (n > 0) g_bytes += (uint64_t)n;
        else if (n < 0 && errno != EAGAIN && errno != EINTR) goto dead;
    } else {
        n = recv(c->fd, buf, CHUNK, 0);
        if (n > 0) g_bytes += (uint64_t)n;
        else if (n == 0 || (errno != EAGAIN && errno != EINTR)) goto dead;
    }
    return;
dead:
    g_err[E_EOF]++, g_established--;
    conn_close(c);
    c->state = S_DONE;
}

static void check_timers(uint64_t now) {
    for (int i = 0; i < g_conc; i++) {
        conn_t *c = &g_c[i];
        if (c->state == S_BACKOFF && now >= c->deadline) {
            if (now < g_w1) conn_start(c, now);
            else c->state = S_DONE;
        } else if (c->state >= S_CONNECTING && c->state <= S_ECHO && now >= c->deadline) {
            conn_fail(c, E_TIMEOUT, now);
        }
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!g_nlat) return 0;
    size_t i = (size_t)(p / 100.0 * (double)(g_nlat - 1) + 0.5);
    return g_lat[i < g_nlat ? i : g_nlat - 1] / 1000.0;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* The load loop of every mode; returns the bulk window's bytes/s. */
static double run(void) {
    struct epoll_event evs[512];
    static unsigned char buf[CHUNK];
    uint64_t now = now_ns(), last_scan = now, b0 = 0, t0 = 0;
    uint64_t scan_every = g_mode == M_IDLE ? 10000000ULL : 1000000ULL;
    int ready = 0, release = 0;
    memset(buf, 'u', sizeof buf);
    if (g_mode == M_IDLE) {  /* stdin readable (input or EOF) releases the sessions */
        struct epoll_event se = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = NULL};
        if (epoll_ctl(g_ep, EPOLL_CTL_ADD, 0, &se) < 0) fprintf(stderr, "connload: stdin not pollable\n");
    } else {
        for (int i = 0; i < g_conc; i++) conn_start(&g_c[i], now);
    }
    int next = 0;
    for (;;) {
        while (g_mode == M_IDLE && next < g_conc && g_active < g_inflight) {
            g_active++;
            conn_start(&g_c[next++], now_ns());
        }
        int n = epoll_wait(g_ep, evs, 512, g_mode == M_IDLE ? 20 : 5);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                char tmp[256];
                if (read(0, tmp, sizeof tmp) <= 0) epoll_ctl(g_ep, EPOLL_CTL_DEL, 0, NULL);
                release = 1;
            } else if (c->state == S_BULK) {
                bulk_event(c, evs[i].events, buf);
            } else {
                advance(c, evs[i].events);
            }
        }
        now = now_ns();
        if (now - last_scan > scan_every) check_timers(now), last_scan = now;
        if (g_mode == M_BULK && !t0 && now >= g_w0) t0 = now, b0 = g_bytes;
        if (g_mode == M_IDLE && !ready && g_finished >= g_conc) {
            uint64_t errs = 0;
            for (int k = 0; k < E_N; k++) errs += g_err[k];
            printf("READY established=%d errors=%llu\n", g_established, (unsigned long long)errs);
            fflush(stdout);
            ready = 1;
        }
        if ((ready && release) || now >= g_w1) break;
    }
    for (int i = 0; i < g_conc; i++) conn_close(&g_c[i]);
    return g_mode == M_BULK && t0 && now > t0 ? (double)(g_bytes - b0) / ((now - t0) / 1e9) : 0;
}

/* ---- the target server ---- */

enum { K_ECHO = 1, K_SINK, K_SOURCE };
typedef struct {
    int fd, kind, listener;
    size_t off, len;
    char *buf;
} tconn_t;
static volatile sig_atomic_t g_stop;
static void on_sig(int s) { (void)s, g_stop = 1; }

static int listener(int family, int port) {
    int one = 1, fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    a4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a6.sin6_addr = in6addr_loopback;
    if (family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if ((family == AF_INET ? bind(fd, (struct sockaddr *)&a4, sizeof a4)
                           : bind(fd, (struct sockaddr *)&a6, sizeof a6)) < 0 || listen(fd, 4096) < 0) {
        close(fd);
        if (family == AF_INET) die("cannot listen on a 127.0.0.1 port");
        return -1;  /* no ::1: IPv4 is enough */
    }
    return fd;
}

/* 0 keep, -1 close */
static int serve_event(int ep, tconn_t *c, uint32_t ev, char *scratch) {
    ssize_t n;
    if (c->kind == K_ECHO) {
        for (;;) {
            while (c->off < c->len) {
                n = write(c->fd, c->buf + c->off, c->len - c->off);
                if (n < 0) {
                    struct epoll_event e = {.events = EPOLLOUT | EPOLLRDHUP, .data.ptr = c};
                    return errno == EAGAIN && epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e) == 0 ? 0 : -1;
                }
                c->off += (size_t)n;
            }
            if (ev & EPOLLOUT) {
                struct epoll_event e = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                ev &= ~(uint32_t)EPOLLOUT;
            }
            n = read(c->fd, c->buf, 65536);
            if (n <= 0) return n < 0 && errno == EAGAIN ? 0 : -1;
            c->off = 0, c->len = (size_t)n;
        }
    }
    if (c->kind == K_SINK) {
        for (int i = 0; i < 8; i++) {
            n = read(c->fd, scratch, 2 * CHUNK);
            if (n <= 0) return n < 0 && errno == EAGAIN ? 0 : -1;
            if (n < 2 * CHUNK) return 0;
        }
        return 0;
    }
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {  /* the source's peer never sends */
        n = read(c->fd, scratch, 2 * CHUNK);
        if (n == 0 || (n < 0 && errno != EAGAIN)) return -1;
    }
    for (int i = 0; (ev & EPOLLOUT) && i < 8; i++) {
        n = write(c->fd, scratch, 2 * CHUNK);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        if (n < 2 * CHUNK) return 0;
    }
    return 0;
}

static int serve_main(int argc, char **argv) {
    int ports[4] = {0};
    double max_s = 14400;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--echo")) ports[K_ECHO] = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sink")) ports[K_SINK] = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--source")) ports[K_SOURCE] = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--max-seconds")) max_s = atof(argv[i + 1]);
        else die("usage: connload serve --echo PORT --sink PORT --source PORT [--max-seconds S]");
    }
    struct sigaction sa = {.sa_handler = on_sig};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    static char scratch[2 * CHUNK];
    memset(scratch, 'x', sizeof scratch);
    for (int k = K_ECHO; k <= K_SOURCE; k++) {
        for (int f = 0; ports[k] && f < 2; f++) {
            int fd = listener(f ? AF_INET6 : AF_INET, ports[k]);
            if (fd < 0) continue;
            tconn_t *l = calloc(1, sizeof *l);
            l->fd = fd, l->kind = k, l->listener = 1;
            struct epoll_event e = {.events = EPOLLIN, .data.ptr = l};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
        }
    }
    struct epoll_event evs[256];
    double end = now_ns() / 1e9 + max_s;
    while (!g_stop && now_ns() / 1e9 < end) {
        int n = epoll_wait(ep, evs, 256, 200);
        for (int i = 0; i < n; i++) {
            tconn_t *c = evs[i].data.ptr;
            for (int j = 0; c->listener && j < 64; j++) {
                int one = 1, fd = accept4(c->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) break;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                tconn_t *nc = calloc(1, sizeof *nc);
                nc->fd = fd, nc->kind = c->kind;
                if (nc->kind == K_ECHO) nc->buf = malloc(65536);
                struct epoll_event e = {.events = EPOLLIN | EPOLLRDHUP | (nc->kind == K_SOURCE ? EPOLLOUT : 0),
                                        .data.ptr = nc};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
            }
            if (c->listener) continue;
            uint32_t ev = evs[i].events;
            if (serve_event(ep, c, ev, scratch) < 0 || ((ev & (EPOLLHUP | EPOLLERR)) && c->kind != K_SOURCE)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                free(c->buf);
                free(c);
            }
        }
    }
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: connload serve --echo PORT --sink PORT --source PORT [--max-seconds S]\n"
            "       connload connrate|bulk|idle -T HOST:PORT (-p HOST:PORT | --direct) [options]\n"
            "  -c N           clients (connrate) / sessions (bulk, idle); default 1\n"
            "  -d SEC         measured seconds (connrate, bulk; default 5); idle: hold limit (120)\n"
            "  -w SEC         warm-up before the window (default 0.5)\n"
            "  --dir up|down  bulk direction (default up)\n"
            "  --inflight N   idle: handshakes at a time (default 64)\n"
            "  --timeout SEC  per-handshake limit (default 5)\n"
            "  --src-ips N    IPv4 source spread over 127.0.0.1..N (default 1)\n");
    exit(2);
}

int main(int argc, char **argv) {
    char host[256], target[300] = "", proxy[300] = "";
    int port, dur_set = 0;
    if (argc < 2) usage();
    if (!strcmp(argv[1], "serve")) return serve_main(argc, argv);
    g_mode = !strcmp(argv[1], "connrate") ? M_CONNRATE : !strcmp(argv[1], "bulk") ? M_BULK
             : !strcmp(argv[1], "idle") ? M_IDLE : 0;
    if (!g_mode) usage();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--direct")) { g_direct = 1; continue; }
        if (!v) usage();
        i++;
        if (!strcmp(a, "-p")) snprintf(proxy, sizeof proxy, "%s", v);
        else if (!strcmp(a, "-T")) snprintf(target, sizeof target, "%s", v);
        else if (!strcmp(a, "-c")) g_conc = atoi(v);
        else if (!strcmp(a, "-d")) g_duration = atof(v), dur_set = 1;
        else if (!strcmp(a, "-w")) g_warmup = atof(v);
        else if (!strcmp(a, "--dir")) { if (strcmp(v, "up") && strcmp(v, "down")) usage(); g_dir_up = !strcmp(v, "up"); }
        else if (!strcmp(a, "--inflight")) g_inflight = atoi(v);
        else if (!strcmp(a, "--timeout")) g_timeout = atof(v);
        else if (!strcmp(a, "--src-ips")) g_src_ips = atoi(v);
        else usage();
    }
    if (g_mode == M_IDLE) g_warmup = 0, g_duration = dur_set ? g_duration : 120;
    if (!target[0] || (!proxy[0] && !g_direct)) die("-T and -p (or --direct) are required");
    if (g_conc < 1 || g_conc > 200000 || g_duration <= 0 || g_duration > 600 || g_warmup < 0 ||
        g_warmup > 60 || g_src_ips < 1 || g_src_ips > 250 || g_inflight < 1 || g_timeout <= 0)
        die("an option is out of range (-c 1..200000, -d 0..600, -w 0..60, --src-ips 1..250)");
    if (split_hostport(target, host, sizeof host, &port)) die("bad -T");
    build_request(host, port);
    resolve(host, port, &g_target, &g_target_len);
    if (!g_direct) {
        if (split_hostport(proxy, host, sizeof host, &port)) die("bad -p");
        resolve(host, port, &g_proxy, &g_proxy_len);
    }
    for (int i = 0; i < MSG; i++) g_msg[i] = (unsigned char)('a' + i % 26);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) rl.rlim_cur = rl.rlim_max, setrlimit(RLIMIT_NOFILE, &rl);
    signal(SIGPIPE, SIG_IGN);
    g_c = calloc((size_t)g_conc, sizeof *g_c);
    for (int i = 0; i < g_conc; i++) g_c[i].fd = -1;
    g_ep = epoll_create1(EPOLL_CLOEXEC);

    double cpu0 = cpu_s();
    uint64_t start = now_ns();
    g_w0 = start + (uint64_t)(g_warmup * 1e9);
    g_w1 = g_w0 + (uint64_t)(g_duration * 1e9);
    double bps = run();
    double wall = (now_ns() - start) / 1e9, cpu = cpu_s() - cpu0;
    qsort(g_lat, g_nlat, sizeof *g_lat, cmp_u32);

    uint64_t errs = 0;
    char ej[512];
    int eo = snprintf(ej, sizeof ej, "{");
    for (int e = 0; e < E_N; e++) {
        errs += g_err[e];
        eo += snprintf(ej + eo, sizeof ej - (size_t)eo, "%s\"%s\":%llu", e ? "," : "", err_names[e],
                       (unsigned long long)g_err[e]);
    }
    snprintf(ej + eo, sizeof ej - (size_t)eo, "}");
    const char *mode = g_mode == M_CONNRATE ? "connrate" : g_mode == M_BULK ? "bulk" : "idle";
    printf("{\"mode\":\"%s\",\"direct\":%s,\"conc\":%d,\"errors\":%llu,\"err\":%s,"
           "\"client_cpu_s\":%.3f,\"wall_s\":%.3f",
           mode, g_direct ? "true" : "false", g_conc, (unsigned long long)errs, ej, cpu, wall);
    if (g_mode == M_CONNRATE) {
        double rate = (double)g_ok_window / g_duration;
        printf(",\"rate\":%.1f,\"ok_window\":%llu,\"ok_total\":%llu,\"p50_us\":%.1f,\"p90_us\":%.1f,"
               "\"p99_us\":%.1f}\n", rate, (unsigned long long)g_ok_window,
               (unsigned long long)g_ok_total, pct(50), pct(90), pct(99));
        fprintf(stderr, "connrate c=%d: %.0f sessions/s, %llu errors, p50 %.0f us, p99 %.0f us\n", g_conc,
                rate, (unsigned long long)errs, pct(50), pct(99));
    } else if (g_mode == M_BULK) {
        printf(",\"dir\":\"%s\",\"MBps\":%.2f,\"bytes_total\":%llu,\"established\":%d}\n",
               g_dir_up ? "up" : "down", bps / 1e6, (unsigned long long)g_bytes, g_established);
        fprintf(stderr, "bulk %s c=%d: %.1f MB/s, %d established, %llu errors\n", g_dir_up ? "up" : "down",
                g_conc, bps / 1e6, g_established, (unsigned long long)errs);
    } else {
        printf(",\"established_at_end\":%d,\"p50_us\":%.1f,\"p99_us\":%.1f}\n", g_established, pct(50),
               pct(99));
        fprintf(stderr, "idle c=%d: %d established, %llu errors\n", g_conc, g_established,
                (unsigned long long)errs);
    }
    return 0;
}
