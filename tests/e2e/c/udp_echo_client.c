/* A UDP client the old way: sendto a target, recvfrom the answer, COUNT times.
 * Under Dante's socksify the sendto/recvfrom go through a SOCKS UDP ASSOCIATE.
 * Usage: udp_echo_client HOST PORT COUNT SIZE
 * Prints "OK <received> <lost> <from-ip> <from-port>" or exits non-zero.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT COUNT SIZE\n", argv[0]);
        return 2;
    }
    struct addrinfo hints = {0}, *ai;
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_flags = AI_NUMERICHOST;
    if (getaddrinfo(argv[1], argv[2], &hints, &ai) != 0) {
        fprintf(stderr, "bad address\n");
        return 2;
    }
    int count = atoi(argv[3]), size = atoi(argv[4]);
    int s = socket(ai->ai_family, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    struct timeval tv = {5, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char *out = malloc((size_t)size + 16), in[65536];
    int received = 0, lost = 0;
    char from[INET6_ADDRSTRLEN] = "-";
    int from_port = 0;
    for (int i = 0; i < count; i++) {
        memset(out, 'a' + i % 26, (size_t)size);
        int n = snprintf(out, (size_t)size + 16, "%d:", i);
        if (size > n) out[n] = 'a'; else size = n;
        if (sendto(s, out, (size_t)size, 0, ai->ai_addr, ai->ai_addrlen) != size) {
            perror("sendto");
            return 1;
        }
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        ssize_t r = recvfrom(s, in, sizeof in, 0, (struct sockaddr *)&ss, &len);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) { lost++; continue; }
            perror("recvfrom");
            return 1;
        }
        if (r != size || memcmp(in, out, (size_t)size) != 0) {
            fprintf(stderr, "datagram %d came back changed (%zd bytes)\n", i, r);
            return 1;
        }
        received++;
        if (ss.ss_family == AF_INET6) {
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, from, sizeof from);
            from_port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
        } else {
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, from, sizeof from);
            from_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        }
    }
    printf("OK %d %d %s %d\n", received, lost, from, from_port);
    return 0;
}
