// Instantiates an op's kernel header once per SIMD path (see common.h). No include guard on purpose: an
// op's .cpp defines FASTDD_ISA_HEADER (the header's quoted path) and includes this file once; the kernel
// header puts its code in `namespace FASTDD_ISA` and is included three times with FASTDD_ISA set to
// isa_scalar, isa_avx2 and isa_avx512 (the last two on x86-64 with GCC/Clang only). The kernel header must
// include nothing itself (the .cpp includes what it needs first), since its text lands inside
// target-specific pragma regions.
#ifndef FASTDD_ISA_HEADER
#error "define FASTDD_ISA_HEADER before including isa_variants.h"
#endif

#pragma GCC push_options
#pragma GCC optimize("no-tree-vectorize")
#define FASTDD_ISA isa_scalar
#include FASTDD_ISA_HEADER
#undef FASTDD_ISA
#pragma GCC pop_options

#ifdef FASTDD_X86_ISA_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2")
#define FASTDD_ISA isa_avx2
#include FASTDD_ISA_HEADER
#undef FASTDD_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define FASTDD_ISA isa_avx512
#include FASTDD_ISA_HEADER
#undef FASTDD_ISA
#pragma GCC pop_options
#endif

#undef FASTDD_ISA_HEADER
