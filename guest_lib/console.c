/* Console on VTL_PORT_CONSOLE and a small printf.  The console is for people: the VMM
 * tags each line with the VTL it came from (a guest cannot write another VTL's lines),
 * and results go through the report channel (report.c), never through this text. */
#include <stdarg.h>
#include "lib.h"

void console_putc(char c) { OUTB_IMM(VTL_PORT_CONSOLE, c); }

static void put_num(uint64_t v, int base, int width, int zero, int neg, int left, int alt)
{
	char buf[24];
	int n = 0, len;
	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	if (neg)
		buf[n++] = '-';
	len = n + (alt ? 2 : 0);
	while (!left && len < width)
		console_putc(zero ? '0' : ' '), len++;
	if (alt)
		console_putc('0'), console_putc('x');
	while (n)
		console_putc(buf[--n]);
	while (left && len < width)
		console_putc(' '), len++;
}

int printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			console_putc(*fmt);
			continue;
		}
		fmt++;
		int alt = 0, zero = 0, width = 0, lng = 0, left = 0;
		for (;; fmt++) {
			if (*fmt == '#') alt = 1;
			else if (*fmt == '0') zero = 1;
			else if (*fmt == '-') left = 1;
			else break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') { lng++; fmt++; }
		switch (*fmt) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			int len = s ? (int)strlen(s) : 0;
			while (!left && len < width)
				console_putc(' '), len++;
			while (s && *s)
				console_putc(*s++);
			while (left && len < width)
				console_putc(' '), len++;
			break;
		}
		case 'c': console_putc((char)va_arg(ap, int)); break;
		case 'd': {
			int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
			put_num(v < 0 ? -(uint64_t)v : (uint64_t)v, 10, width, zero, v < 0, left, 0);
			break;
		}
		case 'u': put_num(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, width, zero, 0, left, 0); break;
		case 'p': alt = 1; lng = 1; /* fall through */
		case 'x':
			put_num(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, width, zero, 0, left, alt);
			break;
		case '%': console_putc('%'); break;
		default: console_putc('?'); break;
		}
	}
	va_end(ap);
	return 0;
}

void print_hex_bytes(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		printf("%02x", p[i]);
}

void guest_exit(uint32_t status)
{
	asm volatile("outl %%eax, %[p]" :: "a"(status), [p] "i"(VTL_PORT_EXIT) : "memory");
	for (;;)
		asm volatile("cli; hlt");
}
