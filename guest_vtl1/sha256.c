/* SHA-256 after FIPS 180-4, section 6.2: 64-byte blocks, 64 rounds each, big-endian
 * words, the message padded with 0x80, zeros and its length in bits (u64 big-endian).
 * Written for clarity over speed; VTL1 hashes at most a kernel image at a time. */
#include "sha256.h"

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static inline uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

/* One round with the eight working variables named, not moved: this host emulates every
 * guest instruction (~0.7 us each), and fully unrolled rounds that rename a..h instead of
 * shifting them cost fewer instructions than a loop; Ch and Maj in their 3- and 4-operation
 * forms (FIPS 180-4 allows any equivalent). */
#define S0(x) (ror(x, 2) ^ ror(x, 13) ^ ror(x, 22))
#define S1(x) (ror(x, 6) ^ ror(x, 11) ^ ror(x, 25))
#define ROUND(a, b, c, d, e, f, g, h, t)                                              \
	do {                                                                          \
		uint32_t t1 = h + S1(e) + (g ^ (e & (f ^ g))) + K[t] + w[t];            \
		d += t1;                                                              \
		h = t1 + S0(a) + ((a & b) | (c & (a | b)));                             \
	} while (0)
#define ROUND8(t)                                                                     \
	do {                                                                          \
		ROUND(a, b, c, d, e, f, g, h, (t) + 0);                               \
		ROUND(h, a, b, c, d, e, f, g, (t) + 1);                               \
		ROUND(g, h, a, b, c, d, e, f, (t) + 2);                               \
		ROUND(f, g, h, a, b, c, d, e, (t) + 3);                               \
		ROUND(e, f, g, h, a, b, c, d, (t) + 4);                               \
		ROUND(d, e, f, g, h, a, b, c, (t) + 5);                               \
		ROUND(c, d, e, f, g, h, a, b, (t) + 6);                               \
		ROUND(b, c, d, e, f, g, h, a, (t) + 7);                               \
	} while (0)

static void block(uint32_t hv[8], const uint8_t *p)
{
	uint32_t w[64];
	for (int t = 0; t < 16; t++) {          /* big-endian words: a load and a BSWAP */
		uint32_t v;
		__builtin_memcpy(&v, p + 4 * t, 4);
		w[t] = __builtin_bswap32(v);
	}
	for (int t = 16; t < 64; t++) {
		uint32_t s0 = ror(w[t - 15], 7) ^ ror(w[t - 15], 18) ^ (w[t - 15] >> 3);
		uint32_t s1 = ror(w[t - 2], 17) ^ ror(w[t - 2], 19) ^ (w[t - 2] >> 10);
		w[t] = w[t - 16] + s0 + w[t - 7] + s1;
	}
	uint32_t a = hv[0], b = hv[1], c = hv[2], d = hv[3], e = hv[4], f = hv[5], g = hv[6], h = hv[7];
	ROUND8(0);
	ROUND8(8);
	ROUND8(16);
	ROUND8(24);
	ROUND8(32);
	ROUND8(40);
	ROUND8(48);
	ROUND8(56);
	hv[0] += a; hv[1] += b; hv[2] += c; hv[3] += d; hv[4] += e; hv[5] += f; hv[6] += g; hv[7] += h;
}

void sha256_init(struct sha256 *s)
{
	static const uint32_t iv[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
					0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
	for (int i = 0; i < 8; i++)
		s->h[i] = iv[i];
	s->len = 0;
}

void sha256_update(struct sha256 *s, const void *data, size_t n)
{
	const uint8_t *p = data;
	size_t have = s->len % 64;
	s->len += n;
	if (have) {                     /* fill the partial block first */
		size_t take = 64 - have < n ? 64 - have : n;
		for (size_t i = 0; i < take; i++)
			s->buf[have + i] = p[i];
		p += take;
		n -= take;
		if (have + take < 64)
			return;
		block(s->h, s->buf);
	}
	for (; n >= 64; p += 64, n -= 64)   /* whole blocks straight from the input */
		block(s->h, p);
	for (size_t i = 0; i < n; i++)
		s->buf[i] = p[i];
}

void sha256_final(struct sha256 *s, uint8_t out[32])
{
	uint64_t bits = s->len * 8;
	static const uint8_t pad[64] = { 0x80 };
	/* 0x80, then zeros up to 56 mod 64, then the length: 1..64 bytes of padding. */
	size_t padlen = (s->len % 64 < 56) ? 56 - s->len % 64 : 120 - s->len % 64;
	sha256_update(s, pad, padlen);
	uint8_t l[8];
	for (int i = 0; i < 8; i++)
		l[i] = (uint8_t)(bits >> (56 - 8 * i));
	sha256_update(s, l, 8);
	for (int i = 0; i < 8; i++) {
		out[4 * i] = (uint8_t)(s->h[i] >> 24);
		out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
		out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
		out[4 * i + 3] = (uint8_t)s->h[i];
	}
}

void sha256(const void *data, size_t n, uint8_t out[32])
{
	struct sha256 s;
	sha256_init(&s);
	sha256_update(&s, data, n);
	sha256_final(&s, out);
}
