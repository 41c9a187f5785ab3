/* udpload: UDP ASSOCIATE load generator and UDP echo target for socksd's benchmarks (loopback).
 *
 *   udpload echo PORT [HOST]
 *       UDP echo server (recvmmsg/sendmmsg batches) until killed.
 *   udpload run --proxy HOST:PORT --target IP:PORT [--size N] [--assoc C] [--window W]
 *               [--duration S] [--warmup S] [--direct]
 *       C associations (each: TCP control connection, no-auth greeting, UDP ASSOCIATE declaring
 *       its UDP socket's address, UDP socket connected to the relay's BND), each keeping up to W
 *       datagrams of N payload bytes in flight to the echo target. --direct: no proxy, the same
 *       loop straight to the target (the loopback baseline).
 *       Prints one JSON object: echoed datagrams per second (each crossed the relay twice),
 *       payload MB/s of the echoes (one direction's worth), datagrams sent, received, lost.
 *
 * Loss: a datagram whose echo has not come back 200 ms after the last progress of its
 * association frees its window slot and is counted as lost. Every loop is bounded in time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_ASSOC 256
#define MAX_DGRAM 65536

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int parse_hostport(const char *text, struct sockaddr_storage *ss, socklen_t *len) {
    char host[128];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = 0;
    int port = atoi(colon + 1);
    char *h = host;
    if (h[0] == '[') {
        h++;
        h[strlen(h) - 1] = 0;
    }
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, h, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *len = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, h, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *len = sizeof *a6;
        return 0;
    }
    return -1;
}

/* SOCKS address field (ATYP ADDR PORT) of a sockaddr; returns its length. */
static int socks_addr(const struct sockaddr_storage *ss, unsigned char *out) {
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        out[0] = 1;
        memcpy(out + 1, &a->sin_addr, 4);
        memcpy(out + 5, &a->sin_port, 2);
        return 7;
    }
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
    out[0] = 4;
    memcpy(out + 1, &a->sin6_addr, 16);
    memcpy(out + 17, &a->sin6_port, 2);
    return 19;
}

static void read_exact(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) die("proxy closed during handshake");
        got += (size_t)r;
    }
}

static int echo_main(int argc, char **argv) {
    if (argc < 3) return 2;
    struct sockaddr_storage ss;
    socklen_t len;
    char spec[160];
    snprintf(spec, sizeof spec, "%s:%s", argc > 3 ? argv[3] : "127.0.0.1", argv[2]);
    if (parse_hostport(spec, &ss, &len) < 0) die("address");
    int s = socket(ss.ss_family, SOCK_DGRAM, 0);
    int buf = 8 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    setsockopt(s, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    if (bind(s, (struct sockaddr *)&ss, len) < 0) die("bind");
    enum { BATCH = 32 };
    static char data[BATCH][MAX_DGRAM];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_storage from[BATCH];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = data[i];
            iov[i].iov_len = MAX_DGRAM;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int n = recvmmsg(s, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("recvmmsg");
        }
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        sendmmsg(s, msgs, (unsigned)n, 0);
    }
}

struct assoc {
    int tcp, udp;
    int inflight;
    double last_progress;
    uint64_t next_seq;
};

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "echo") == 0) return echo_main(argc, argv);
    if (argc < 2 || strcmp(argv[1], "run") != 0) {
        fprintf(stderr, "usage: udpload echo PORT [HOST] | udpload run --proxy H:P --target IP:P ...\n");
        return 2;
    }
    const char *proxy = NULL, *target = NULL;
    int size = 512, nassoc = 1, window = 16, direct = 0;
    double duration = 5, warmup = 0.5;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--proxy") && i + 1 < argc) proxy = argv[++i];
        else if (!strcmp(argv[i], "--target") && i + 1 < argc) target = argv[++i];
        else if (!strcmp(argv[i], "--size") && i + 1 < argc) size = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--assoc") && i + 1 < argc) nassoc = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--window") && i + 1 < argc) window = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--duration") && i + 1 < argc) duration = atof(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atof(argv[++i]);
        else if (!strcmp(argv[i], "--direct")) direct = 1;
        else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (!target || (!proxy && !direct) || nassoc < 1 || nassoc > MAX_ASSOC || size < 8 ||
        size > 65000) {
        fprintf(stderr, "need --target, --proxy (or --direct), 1 <= --assoc <= %d, 8 <= --size <= 65000\n",
                MAX_ASSOC);
        return 2;
    }
    struct sockaddr_storage tss, pss;
    socklen_t tlen, plen;
    if (parse_hostport(target, &tss, &tlen) < 0) die("target address");
    if (proxy && parse_hostport(proxy, &pss, &plen) < 0) die("proxy address");
    unsigned char header[32];
    int hlen = 0;
    if (!direct) {
        header[0] = header[1] = header[2] = 0;
        hlen = 3 + socks_addr(&tss, header + 3);
    }

    struct assoc as[MAX_ASSOC];
    for (int i = 0; i < nassoc; i++) {
        struct assoc *a = &as[i];
        memset(a, 0, sizeof *a);
        a->tcp = -1;
        if (direct) {
            a->udp = socket(tss.ss_family, SOCK_DGRAM, 0);
            if (connect(a->udp, (struct sockaddr *)&tss, tlen) < 0) die("connect target");
        } else {
            a->tcp = socket(pss.ss_family, SOCK_STREAM, 0);
            if (connect(a->tcp, (struct sockaddr *)&pss, plen) < 0) die("connect proxy");
            int one = 1;
            setsockopt(a->tcp, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            struct sockaddr_storage local;
            socklen_t llen = sizeof local;
            getsockname(a->tcp, (struct sockaddr *)&local, &llen);
            a->udp = socket(pss.ss_family, SOCK_DGRAM, 0);
            if (local.ss_family == AF_INET) ((struct sockaddr_in *)&local)->sin_port = 0;
            else ((struct sockaddr_in6 *)&local)->sin6_port = 0;
            if (bind(a->udp, (struct sockaddr *)&local, llen) < 0) die("bind udp");
            llen = sizeof local;
            getsockname(a->udp, (struct sockaddr *)&local, &llen);
            unsigned char msg[64], reply[64];
            if (write(a->tcp, "\x05\x01\x00", 3) != 3) die("greeting");
            read_exact(a->tcp, reply, 2);
            if (reply[0] != 5 || reply[1] != 0) die("method refused");
            msg[0] = 5, msg[1] = 3, msg[2] = 0;
            int n = 3 + socks_addr(&local, msg + 3);
            if (write(a->tcp, msg, (size_t)n) != n) die("request");
            read_exact(a->tcp, reply, 4);
            if (reply[1] != 0) {
                fprintf(stderr, "UDP ASSOCIATE refused: %d\n", reply[1]);
                return 1;
            }
            struct sockaddr_storage relay;
            socklen_t rlen;
            memset(&relay, 0, sizeof relay);
            if (reply[3] == 1) {
                struct sockaddr_in *r = (struct sockaddr_in *)&relay;
                read_exact(a->tcp, reply + 4, 6);
                r->sin_family = AF_INET;
                memcpy(&r->sin_addr, reply + 4, 4);
                memcpy(&r->sin_port, reply + 8, 2);
                if (r->sin_addr.s_addr == 0) /* a server answering 0.0.0.0: use its address */
                    r->sin_addr = ((struct sockaddr_in *)&pss)->sin_addr;
                rlen = sizeof *r;
            } else if (reply[3] == 4) {
                struct sockaddr_in6 *r = (struct sockaddr_in6 *)&relay;
                read_exact(a->tcp, reply + 4, 18);
                r->sin6_family = AF_INET6;
                memcpy(&r->sin6_addr, reply + 4, 16);
                memcpy(&r->sin6_port, reply + 20, 2);
                rlen = sizeof *r;
            } else {
                fprintf(stderr, "unexpected BND ATYP %d\n", reply[3]);
                return 1;
            }
            if (connect(a->udp, (struct sockaddr *)&relay, rlen) < 0) die("connect relay");
        }
        int buf = 4 << 20;
        setsockopt(a->udp, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
        setsockopt(a->udp, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    }

    static unsigned char out[MAX_DGRAM], in[MAX_DGRAM];
    memcpy(out, header, (size_t)hlen);
    memset(out + hlen, 'x', (size_t)size);
    struct pollfd pfd[MAX_ASSOC];
    for (int i = 0; i < nassoc; i++) pfd[i].fd = as[i].udp, pfd[i].events = POLLIN;
    double start = now(), measure_from = start + warmup, end = measure_from + duration;
    uint64_t sent = 0, received = 0, lost = 0, win_dgrams = 0, win_bytes = 0;
    for (int i = 0; i < nassoc; i++) as[i].last_progress = start;
    double t = start;
    while (t < end) {
        for (int i = 0; i < nassoc; i++) {
            struct assoc *a = &as[i];
            while (a->inflight < window) {
                memcpy(out + hlen, &a->next_seq, 8);
                if (send(a->udp, out, (size_t)(hlen + size), 0) < 0) {
                    if (errno == EAGAIN || errno == ENOBUFS || errno == ECONNREFUSED) break;
                    die("send");
                }
                a->next_seq++;
                a->inflight++;
                sent++;
            }
        }
        int n = poll(pfd, (nfds_t)nassoc, 50);
        t = now();
        if (n < 0 && errno != EINTR) die("poll");
        for (int i = 0; i < nassoc; i++) {
            struct assoc *a = &as[i];
            if (pfd[i].revents & POLLIN) {
                for (;;) {
                    ssize_t r = recv(a->udp, in, sizeof in, MSG_DONTWAIT);
                    if (r < 0) break;
                    if (r != hlen + size) {
                        fprintf(stderr, "datagram of %zd bytes, expected %d\n", r, hlen + size);
                        return 1;
                    }
                    a->inflight--;
                    a->last_progress = t;
                    received++;
                    if (t >= measure_from) {
                        win_dgrams++;
                        win_bytes += (uint64_t)size;
                    }
                }
            }
            if (a->inflight > 0 && t - a->last_progress > 0.2) {
                lost += (uint64_t)a->inflight; /* their echoes never came: free the window */
                a->inflight = 0;
                a->last_progress = t;
            }
        }
    }
    /* drain what is still in flight, for at most 0.5 s */
    double stop = now() + 0.5;
    int pending = 0;
    for (int i = 0; i < nassoc; i++) pending += as[i].inflight;
    while (pending > 0 && now() < stop) {
        if (poll(pfd, (nfds_t)nassoc, 50) <= 0) continue;
        for (int i = 0; i < nassoc; i++) {
            if (!(pfd[i].revents & POLLIN)) continue;
            while (recv(as[i].udp, in, sizeof in, MSG_DONTWAIT) > 0) {
                as[i].inflight--;
                received++;
                pending--;
            }
        }
    }
    lost += (uint64_t)(pending > 0 ? pending : 0);
    printf("{\"mode\":\"%s\",\"size\":%d,\"assoc\":%d,\"window\":%d,\"duration\":%.3f,"
           "\"dgrams_per_s\":%.1f,\"mb_per_s\":%.2f,\"sent\":%llu,\"received\":%llu,\"lost\":%llu}\n",
           direct ? "direct" : "proxy", size, nassoc, window, duration, win_dgrams / duration,
           win_bytes / duration / 1e6, (unsigned long long)sent, (unsigned long long)received,
           (unsigned long long)lost);
    for (int i = 0; i < nassoc; i++) {
        close(as[i].udp);
        if (as[i].tcp >= 0) close(as[i].tcp);
    }
    return 0;
}
