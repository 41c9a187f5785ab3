/* A TCP server the old way: socket, bind, listen, accept (never accept4, which socksify does not
 * intercept). Under Dante's socksify the bind/listen/accept become a SOCKS BIND request.
 * Usage: bind_accept [-6]   (the socket is bound to the wildcard address, port 0)
 * Prints "LISTEN <ip> <port>" (what getsockname says: the proxy's address under socksify), then
 * "PEER <ip> <port>" after accept, reads until EOF, answers "received <n> bytes <sum>\n", exits.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

static void show(const char *tag, struct sockaddr_storage *ss) {
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss->ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        port = ntohs(a->sin6_port);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        port = ntohs(a->sin_port);
    }
    printf("%s %s %d\n", tag, host, port);
    fflush(stdout);
}

int main(int argc, char **argv) {
    int six = argc > 1 && strcmp(argv[1], "-6") == 0;
    int family = six ? AF_INET6 : AF_INET;
    struct sockaddr_storage ss;
    socklen_t len;
    int s = socket(family, SOCK_STREAM, 0);
    if (s < 0) die("socket");
    memset(&ss, 0, sizeof ss);
    ss.ss_family = family;
    len = six ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    if (bind(s, (struct sockaddr *)&ss, len) < 0) die("bind");
    if (listen(s, 1) < 0) die("listen");
    len = sizeof ss;
    if (getsockname(s, (struct sockaddr *)&ss, &len) < 0) die("getsockname");
    show("LISTEN", &ss);
    len = sizeof ss;
    int c = accept(s, (struct sockaddr *)&ss, &len);
    if (c < 0) die("accept");
    show("PEER", &ss);
    char buf[65536];
    unsigned long total = 0, sum = 0;
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0) die("read");
        if (n == 0) break;
        for (ssize_t i = 0; i < n; i++) sum = (sum * 31 + (unsigned char)buf[i]) % 1000000007UL;
        total += (unsigned long)n;
    }
    char out[128];
    int m = snprintf(out, sizeof out, "received %lu bytes %lu\n", total, sum);
    if (write(c, out, (size_t)m) != m) die("write");
    close(c);
    close(s);
    return 0;
}
