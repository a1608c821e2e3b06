/* The fused RS@k block on CPU: loss and d loss / d similarity of a block of query rows,
 * one query at a time, without the (block x P x N) tensor (rskdist/loss/native.py loads
 * this file; docs/loss.md, "Fused kernel", explains the passes).
 *
 * Per query q with real similarity rows s (n_real) and positives p (docs/method.md 1):
 *   t_z   = s_qz / tau2, virtual items z: t_z = alpha_v t_first + (1 - alpha_v) t_second
 *   pass 1 over z, per p: above_p = sum_z sigma(t_z - t_p), dsum_p = sum_z sigma'(t_z - t_p)
 *          (z == p always left out, z == q unless count_self)
 *   recall: rank_p = 1 + above_p, R_k, the query's loss, coef_p = d loss / d rank_p / tau2
 *   pass 2 over z: g_z = sum_p coef_p sigma'(t_z - t_p); g_p -= coef_p dsum_p
 *   fold:  virtual g_z flows to its two real parents with weights alpha, 1 - alpha.
 *
 * One exp per item, not per (positive, item): with e = exp(t_p - t_z), sigma = 1 / (1 + e)
 * and sigma' = sigma (sigma e), and e = exp(t_p - c) exp(c - t_z) for any centre c. The
 * positives of a query are grouped so that t_p within a group spans at most 2 RSK_HALF;
 * a group computes u_z = exp(c - t_z) once over the items (c its mid-range), v_p =
 * exp(t_p - c) per positive, and both passes then take e = v_p u_z: a multiply, an add, a
 * divide and two multiplies per (p, z). u is clamped to |c - t_z| <= RSK_CLAMP - half the
 * group's span, so that |log e| <= RSK_CLAMP (no overflow, no subnormal); an item is
 * clamped only where |t_z - t_p| > RSK_CLAMP - 2 RSK_HALF = 40 for each p of the group,
 * where sigma is 0 or 1 and sigma' < 5e-18 either way.
 *
 * The file is compiled once per element type: rsk_rows_impl.h is included for float and
 * for double with REAL, EXP and NAME set below.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Returned by rsk_rows_* when scratch memory cannot be allocated (0: done). An error code,
 * not a NaN loss: the file is built with -ffinite-math-only, under which NaN tests may be
 * folded away. */
#define RSK_ENOMEM 1

/* What one call needs: the block's rows and items, by name (ctypes mirrors this layout in
 * rskdist/loss/native.py, _Args). sim, alpha and dsim point to float or double, as the
 * function called (rsk_rows_f32 or rsk_rows_f64); see rsk_rows_impl.h for each field. */
struct rsk_rows_args {
    const void *sim;
    int64_t sim_stride;
    int64_t n_real;
    int64_t n_virtual;
    const int64_t *real_at;
    const int64_t *real_col;
    const int64_t *virt_at;
    const int64_t *first;
    const int64_t *second;
    const void *alpha;
    const int64_t *q;
    const int64_t *pos;
    int64_t width;
    const int64_t *num_pos;
    const double *ks;
    int64_t num_ks;
    const double *tau1;
    double tau2;
    int64_t count_self;
    double scale;
    void *dsim;
    int64_t dsim_stride;
};

/* sigma(x) for |x| > 80 is 0 or 1 in either type; clamping keeps exp finite. */
#define RSK_CLAMP 80
/* Positives whose t lie within 2 * RSK_HALF of each other share one exp per item. */
#define RSK_HALF 20

/* exp(x) for |x| <= 88 in float, branch-free so that loops over it vectorise (8 lanes on
 * AVX2): x = n ln2 + r with |r| <= ln2 / 2, exp(r) = 1 + r + r^2 P(r) with P a degree-5
 * minimax polynomial (relative error about 1e-7, float's own rounding), 2^n built from
 * the exponent bits. */
static inline float exp_f32(float x) {
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f; /* ln2 split so n * hi is exact */
    float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline double exp_f64(double x) { return exp(x); }

#define REAL float
#define EXP exp_f32
#define NAME(name) name##_f32
#include "rsk_rows_impl.h"
#undef REAL
#undef EXP
#undef NAME

#define REAL double
#define EXP exp_f64
#define NAME(name) name##_f64
#include "rsk_rows_impl.h"
#undef REAL
#undef EXP
#undef NAME

/* For the loader: the version of this interface. */
int rsk_rows_abi(void) { return 5; }
