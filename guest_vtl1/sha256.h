/* SHA-256 (FIPS 180-4), incremental, for VTL1: the allowlist check of kexec images and
 * modules, and VTL_CALL_SHA256.  No FPU/SSE, no tables outside rodata, no allocation. */
#ifndef SHA256_H
#define SHA256_H
#include <stddef.h>
#include <stdint.h>

struct sha256 {
	uint32_t h[8];
	uint64_t len;            /* bytes hashed so far */
	uint8_t buf[64];         /* a partial block: len % 64 bytes */
};

void sha256_init(struct sha256 *s);
void sha256_update(struct sha256 *s, const void *data, size_t n);
void sha256_final(struct sha256 *s, uint8_t out[32]);
void sha256(const void *data, size_t n, uint8_t out[32]);
#endif
