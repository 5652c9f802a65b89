/* Load generator for ident servers, in C so that it is not the bottleneck
 * (bench/loadgen.py, the same thing in Python, tops out near 2,000 queries/s
 * on a 2-core machine). Built at run time by bench/cloadgen.py into a
 * temporary directory; never committed as a binary.
 *
 * One thread, non-blocking sockets on epoll, C connections in flight, one
 * query per connection: connect, send one line, read one reply line, close
 * with a reset (SO_LINGER 0: no TIME_WAIT left behind), start the next.
 * Bounded by a count of queries and by a time limit; a connection without a
 * full reply line after --conn-timeout seconds is a failure.
 *
 *   loadgen --dest 127.0.0.1:1113 --source 127.0.0.2 --pairs pairs.txt
 *           --count 4000 --concurrency 50 [--time-limit 60] [--conn-timeout 20]
 *           [--suffix " : SV"]
 *
 * pairs.txt holds "P1 P2" lines, asked in turn, cyclically. Prints one JSON
 * object with the same keys as bench/loadgen.py, plus "cpu_s": this
 * process's own user + system CPU seconds (getrusage), to show beside the
 * server's.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
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

#define MAX_REPLY 1024      /* a longer "line" is a failure */
#define MAX_QUERY 128
#define MAX_WORDS 32        /* distinct error words / failure reasons kept */
#define MAX_CONNS 4096      /* concurrency bound */
#define MAX_PAIRS 200000
#define MAX_COUNT 10000000

struct conn {
    int fd;                 /* -1: free */
    int64_t t0;             /* ns at connect */
    int q;                  /* query index */
    int len;
    char buf[MAX_REPLY + 1];
};

struct tally { char word[40]; long n; };

static struct tally errors[MAX_WORDS], failures[MAX_WORDS];
static int n_errors, n_failures;
static char sample_userid[160], sample_error[160], sample_bad[160];

static char (*queries)[MAX_QUERY];
static int query_len[MAX_PAIRS];
static int n_queries;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void count_word(struct tally *t, int *n, const char *word) {
    for (int i = 0; i < *n; i++)
        if (strcmp(t[i].word, word) == 0) { t[i].n++; return; }
    if (*n < MAX_WORDS) {
        snprintf(t[*n].word, sizeof t[*n].word, "%s", word);
        t[*n].n = 1;
        (*n)++;
    } else {
        t[MAX_WORDS - 1].n++;   /* lumped with the last kept word */
    }
}

static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20 || c >= 0x7f) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static void json_tally(FILE *f, struct tally *t, int n) {
    fputc('{', f);
    for (int i = 0; i < n; i++) {
        if (i) fputs(", ", f);
        json_string(f, t[i].word);
        fprintf(f, ": %ld", t[i].n);
    }
    fputc('}', f);
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest rank, as bench/loadgen.py's percentile(). */
static double percentile_ms(int64_t *v, long n, double p) {
    if (n == 0) return 0.0;
    long k = (long)((p / 100.0 * n + 0.5) + 0.5) - 1;   /* round(x + 0.5) - 1 */
    if (k < 0) k = 0;
    if (k > n - 1) k = n - 1;
    return v[k] / 1e6;
}

static int read_pairs(const char *path, const char *suffix) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); return -1; }
    queries = calloc(MAX_PAIRS, MAX_QUERY);
    if (!queries) { fclose(f); return -1; }
    unsigned p1, p2;
    while (n_queries < MAX_PAIRS && fscanf(f, "%u %u", &p1, &p2) == 2) {
        int n = snprintf(queries[n_queries], MAX_QUERY, "%u, %u%s\r\n", p1, p2, suffix);
        if (n <= 0 || n >= MAX_QUERY) { fclose(f); return -1; }
        query_len[n_queries++] = n;
    }
    fclose(f);
    return n_queries > 0 ? 0 : -1;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen --dest HOST:PORT --source ADDR --pairs FILE --count N "
                    "--concurrency C [--time-limit S] [--conn-timeout S] [--suffix TEXT]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *dest = NULL, *source = "127.0.0.2", *pairs = NULL, *suffix = "";
    long count = 2000, concurrency = 10;
    double time_limit = 60.0, conn_timeout = 20.0;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) usage();
        const char *k = argv[i], *v = argv[++i];
        if (!strcmp(k, "--dest")) dest = v;
        else if (!strcmp(k, "--source")) source = v;
        else if (!strcmp(k, "--pairs")) pairs = v;
        else if (!strcmp(k, "--count")) count = atol(v);
        else if (!strcmp(k, "--concurrency")) concurrency = atol(v);
        else if (!strcmp(k, "--time-limit")) time_limit = atof(v);
        else if (!strcmp(k, "--conn-timeout")) conn_timeout = atof(v);
        else if (!strcmp(k, "--suffix")) suffix = v;
        else usage();
    }
    if (!dest || !pairs || count < 1 || count > MAX_COUNT || concurrency < 1
        || concurrency > MAX_CONNS || time_limit <= 0 || conn_timeout <= 0)
        usage();
    if (strlen(suffix) > 32) usage();

    struct sockaddr_in dst = {.sin_family = AF_INET}, src = {.sin_family = AF_INET};
    char host[64];
    const char *colon = strrchr(dest, ':');
    if (!colon || (size_t)(colon - dest) >= sizeof host) usage();
    memcpy(host, dest, colon - dest);
    host[colon - dest] = 0;
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1 || inet_pton(AF_INET, source, &src.sin_addr) != 1)
        usage();
    dst.sin_port = htons((uint16_t)atoi(colon + 1));
    if (read_pairs(pairs, suffix) < 0) { fprintf(stderr, "loadgen: %s: no pairs\n", pairs); return 2; }

    struct conn *conns = calloc(concurrency, sizeof *conns);
    int64_t *lat = malloc(sizeof *lat * count);
    if (!conns || !lat) { fprintf(stderr, "loadgen: out of memory\n"); return 1; }
    for (long i = 0; i < concurrency; i++) conns[i].fd = -1;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) { perror("epoll_create1"); return 1; }

    long started = 0, replies = 0, userid = 0, in_flight = 0;
    const int one = 1;
    const struct linger reset = {1, 0};
    int64_t t_start = now_ns();
    int64_t deadline = t_start + (int64_t)(time_limit * 1e9);
    int64_t next_check = t_start + 500000000;
    struct epoll_event events[256];

#define FINISH(c) do { epoll_ctl(ep, EPOLL_CTL_DEL, (c)->fd, NULL); close((c)->fd); \
                       (c)->fd = -1; in_flight--; } while (0)
#define FAIL(c, why) do { count_word(failures, &n_failures, why); FINISH(c); } while (0)

    for (;;) {
        int64_t now = now_ns();
        /* Start connections up to the concurrency, within count and time. */
        for (long slot = 0; slot < concurrency && started < count && now < deadline; slot++) {
            struct conn *c = &conns[slot];
            if (c->fd >= 0) continue;
            int q = (int)(started % n_queries);
            started++;
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) { count_word(failures, &n_failures, "socket"); continue; }
            setsockopt(fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
            if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
                close(fd); count_word(failures, &n_failures, "bind"); continue;
            }
            c->fd = fd; c->q = q; c->len = 0; c->t0 = now_ns();
            in_flight++;
            struct epoll_event ev = {.data.ptr = c};
            int r = connect(fd, (struct sockaddr *)&dst, sizeof dst);
            if (r == 0 || errno == EINPROGRESS) {
                /* On loopback the handshake is usually done: write at once. */
                ssize_t n = send(fd, queries[q], query_len[q], MSG_NOSIGNAL);
                if (n == query_len[q]) ev.events = EPOLLIN;
                else if (n < 0 && (errno == EAGAIN || errno == ENOTCONN)) ev.events = EPOLLOUT;
                else {
                    close(fd); c->fd = -1; in_flight--;
                    count_word(failures, &n_failures, "send");
                    continue;
                }
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            } else {
                close(fd); c->fd = -1; in_flight--;
                count_word(failures, &n_failures, "connect");
            }
        }
        if (in_flight == 0 && (started >= count || now_ns() >= deadline)) break;
        int n = epoll_wait(ep, events, 256, 500);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            if (events[i].events & EPOLLOUT) {
                int err = 0; socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) { FAIL(c, "connect"); continue; }
                ssize_t w = send(c->fd, queries[c->q], query_len[c->q], MSG_NOSIGNAL);
                if (w != query_len[c->q]) { FAIL(c, "send"); continue; }
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                continue;
            }
            ssize_t r = recv(c->fd, c->buf + c->len, MAX_REPLY - c->len, 0);
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                FAIL(c, "recv"); continue;
            }
            if (r == 0) { FAIL(c, c->len ? "closed mid-line" : "closed before the reply"); continue; }
            c->len += (int)r;
            c->buf[c->len] = 0;
            char *end = memchr(c->buf, '\n', c->len);
            if (!end) {
                if (c->len >= MAX_REPLY) FAIL(c, "reply too long");
                continue;
            }
            lat[replies++] = now_ns() - c->t0;
            if (end > c->buf && end[-1] == '\r') end--;
            *end = 0;
            if (strstr(c->buf, "USERID")) {
                userid++;
                if (!sample_userid[0]) snprintf(sample_userid, sizeof sample_userid, "%.150s", c->buf);
            } else if (strstr(c->buf, "ERROR")) {
                char *w = strrchr(c->buf, ':');
                w = w ? w + 1 : c->buf;
                while (*w == ' ') w++;
                char *e = w + strlen(w);
                while (e > w && e[-1] == ' ') *--e = 0;
                count_word(errors, &n_errors, w);
                if (!sample_error[0]) snprintf(sample_error, sizeof sample_error, "%.150s", c->buf);
            } else {
                count_word(failures, &n_failures, "bad reply");
                if (!sample_bad[0]) snprintf(sample_bad, sizeof sample_bad, "%.80s", c->buf);
            }
            FINISH(c);
        }
        int64_t t = now_ns();
        if (t >= next_check) {
            next_check = t + 500000000;
            int64_t limit = t - (int64_t)(conn_timeout * 1e9);
            for (long s = 0; s < concurrency; s++)
                if (conns[s].fd >= 0 && conns[s].t0 < limit) FAIL(&conns[s], "timeout");
        }
    }
    double elapsed = (now_ns() - t_start) / 1e9;
    close(ep);
    qsort(lat, replies, sizeof *lat, cmp_i64);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec
                 + ru.ru_stime.tv_usec / 1e6;
    long failed = 0;
    for (int i = 0; i < n_failures; i++) failed += failures[i].n;

    printf("{\"started\": %ld, \"replies\": %ld, \"userid\": %ld, \"errors\": ", started, replies, userid);
    json_tally(stdout, errors, n_errors);
    printf(", \"failed\": %ld, \"failures\": ", failed);
    json_tally(stdout, failures, n_failures);
    printf(", \"elapsed\": %.6f, \"rate\": %.3f, \"p50_ms\": %.4f, \"p99_ms\": %.4f, \"cpu_s\": %.6f, "
           "\"sample\": {", elapsed, elapsed > 0 ? replies / elapsed : 0.0,
           percentile_ms(lat, replies, 50), percentile_ms(lat, replies, 99), cpu);
    int first = 1;
    const char *keys[] = {"userid", "error", "bad reply"};
    const char *vals[] = {sample_userid, sample_error, sample_bad};
    for (int i = 0; i < 3; i++) {
        if (!vals[i][0]) continue;
        if (!first) fputs(", ", stdout);
        first = 0;
        json_string(stdout, keys[i]);
        fputs(": ", stdout);
        json_string(stdout, vals[i]);
    }
    printf("}}\n");
    return 0;
}
