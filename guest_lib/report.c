/* The report channel (VTL_HC_REPORT, docs/abi.md "Report channel"): results and
 * measurements go to the VMM as struct vtl_report records, never as console text.
 *
 * Each helper fills a record on its own stack and passes its address as the GPA: the
 * built-in kernels run identity-mapped, so a pointer is a GPA, and the stack is in
 * memory the caller may read (VTL0's in VTL0 memory, VTL1's in VTL1's region).  The VMM
 * copies the record (and the data of STAMPS/BYTES) during the hypercall, so the buffers
 * may be reused as soon as the helper returns.  Names longer than 31 bytes and texts
 * longer than 63 are cut, always NUL-terminated.  A refused report is also printed. */
#include "lib.h"

const char *vtl_status_name(uint64_t s)
{
	static const char *const n[] = { "VTL_OK", "VTL_E_INVALID_CODE", "VTL_E_ACCESS_DENIED",
		"VTL_E_INVALID_ARG", "VTL_E_NOT_ENABLED", "VTL_E_ALREADY_ENABLED", "VTL_E_DISABLED",
		"VTL_E_MISALIGNED", "VTL_E_OUT_OF_RANGE", "VTL_E_OVERLAPS_VTL1", "VTL_E_NO_RESOURCES",
		"VTL_E_IMMUTABLE", "VTL_E_POLICY", "VTL_E_BUSY" };
	return s < sizeof(n) / sizeof(n[0]) ? n[s] : "?";
}

static void copy_str(char *dst, const char *src, size_t size)
{
	size_t i = 0;
	for (; src && src[i] && i < size - 1; i++)
		dst[i] = src[i];
	for (; i < size; i++)
		dst[i] = 0;
}

uint64_t report_send(const struct vtl_report *r)
{
	uint64_t st = hypercall(VTL_HC_REPORT, (uint64_t)r, 0, 0, NULL);
	if (st != VTL_OK)
		printf("report %s (kind %u) refused: %s\n", r->name, r->kind, vtl_status_name(st));
	return st;
}

uint64_t report(uint32_t kind, const char *name, uint64_t v0, uint64_t v1, uint64_t v2, uint64_t v3,
		const char *text)
{
	struct vtl_report r;
	memset(&r, 0, sizeof(r));
	r.kind = kind;
	copy_str(r.name, name, sizeof(r.name));
	r.value[0] = v0;
	r.value[1] = v1;
	r.value[2] = v2;
	r.value[3] = v3;
	copy_str(r.text, text, sizeof(r.text));
	return report_send(&r);
}

static uint64_t report_data(uint32_t kind, const char *name, uint64_t v0, const void *data, uint64_t count)
{
	struct vtl_report r;
	memset(&r, 0, sizeof(r));
	r.kind = kind;
	copy_str(r.name, name, sizeof(r.name));
	r.value[0] = v0;
	r.data_gpa = (uint64_t)data;
	r.data_count = count;
	return report_send(&r);
}

uint64_t report_result(const char *name, int ok, const char *why)
{
	return report(VTL_REPORT_RESULT, name, ok ? 0 : 1, 0, 0, 0, ok ? "" : why);
}

uint64_t report_target(const char *name, uint64_t gpa, uint64_t len, uint64_t old)
{
	return report(VTL_REPORT_TARGET, name, gpa, len, old, 0, NULL);
}

uint64_t report_msr(const char *name, uint32_t index, uint64_t old)
{
	return report(VTL_REPORT_MSR, name, index, old, 0, 0, NULL);
}

uint64_t report_status(const char *name, uint64_t code, uint64_t status)
{
	return report(VTL_REPORT_STATUS, name, code, status, 0, 0, vtl_status_name(status));
}

uint64_t report_fault(const char *name, const struct fault_info *fi)
{
	return report(VTL_REPORT_FAULT, name, (uint64_t)fi->vector, fi->error_code, fi->rip, fi->cr2,
		      vector_name(fi->vector));
}

uint64_t report_value(const char *name, uint64_t value)
{
	return report(VTL_REPORT_VALUE, name, value, 0, 0, 0, NULL);
}

uint64_t report_stamps(const char *name, const uint64_t *stamps, uint64_t count, uint64_t per_stamp)
{
	return report_data(VTL_REPORT_STAMPS, name, per_stamp, stamps, count);
}

uint64_t report_exec(const char *name, uint64_t gva, uint64_t gpa, uint64_t marker_gpa, uint64_t marker_value)
{
	return report(VTL_REPORT_EXEC, name, gva, gpa, marker_gpa, marker_value, NULL);
}

uint64_t report_register(const char *name, uint32_t reg, uint64_t old, uint64_t limit)
{
	return report(VTL_REPORT_REGISTER, name, reg, old, limit, 0, NULL);
}

uint64_t report_bytes(const char *name, const void *p, uint64_t n)
{
	return report_data(VTL_REPORT_BYTES, name, 0, p, n);
}
