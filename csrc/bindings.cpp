// The only pybind11 file: validate every array once (dtype, C-contiguity, shape, writability),
// take raw pointers, release the GIL and call the kernel. A bad argument raises ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "dispatch.h"
#include "ops.h"

namespace py = pybind11;
using glm4rt::AttentionArgs;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks dtype, C-contiguity and rank of a kernel argument; `shape` entries < 0 are free.
template <typename T>
void expect(const py::array& a, const char* name, std::vector<py::ssize_t> shape,
            bool writable = false) {
  GLM4RT_CHECK(a.dtype().equal(py::dtype::of<T>()))
      << name << ": expected dtype " << std::string(py::str(py::dtype::of<T>())) << ", got "
      << std::string(py::str(a.dtype()));
  GLM4RT_CHECK(a.flags() & py::array::c_style) << name << ": array must be C-contiguous";
  // Kernels read elements through typed pointers: one at an address that is not a multiple of
  // the element size (a view into a buffer at an odd offset) would be undefined behaviour.
  GLM4RT_CHECK(reinterpret_cast<uintptr_t>(a.data()) % a.itemsize() == 0)
      << name << ": array data is not aligned to its " << a.itemsize() << "-byte elements (a view at an "
      << "odd byte offset): pass a copy";
  GLM4RT_CHECK(a.ndim() == static_cast<py::ssize_t>(shape.size()))
      << name << ": expected " << shape.size() << " dimensions, got shape " << shape_str(a);
  for (size_t i = 0; i < shape.size(); ++i) {
    GLM4RT_CHECK(a.shape(i) <= std::numeric_limits<int>::max())
        << name << ": dimension " << i << " is too large (" << a.shape(i) << ")";
    GLM4RT_CHECK(shape[i] < 0 || a.shape(i) == shape[i])
        << name << ": dimension " << i << " must be " << shape[i] << ", got shape " << shape_str(a);
  }
  GLM4RT_CHECK(!writable || a.writeable()) << name << ": output array must be writable";
}

// Pointer to an optional float32 [N] bias (nullptr for None).
const float* optional_bias(const py::object& bias, int N) {
  if (bias.is_none()) return nullptr;
  py::array b = bias.cast<py::array>();
  expect<float>(b, "bias", {N});
  return static_cast<const float*>(b.data());
}

void matmul(const py::array& x, const py::array& w, const py::object& bias, py::array& out) {
  expect<float>(x, "x", {-1, -1});
  const int M = static_cast<int>(x.shape(0)), K = static_cast<int>(x.shape(1));
  GLM4RT_CHECK(w.ndim() == 2) << "weight: expected 2 dimensions [N, K], got shape " << shape_str(w);
  const int N = static_cast<int>(w.shape(0));
  GLM4RT_CHECK(K > 0 && N > 0) << "matmul: empty weight " << shape_str(w);
  const bool bf16 = w.dtype().equal(py::dtype::of<uint16_t>());
  if (bf16)
    expect<uint16_t>(w, "weight (bf16 bits)", {N, K});
  else
    expect<float>(w, "weight", {N, K});
  const float* bias_ptr = optional_bias(bias, N);
  expect<float>(out, "out", {M, N}, true);
  const float* xp = static_cast<const float*>(x.data());
  float* yp = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  if (bf16)
    glm4rt::matmul_bf16(xp, M, K, static_cast<const uint16_t*>(w.data()), N, bias_ptr, yp);
  else
    glm4rt::matmul_f32(xp, M, K, static_cast<const float*>(w.data()), N, bias_ptr, yp);
}

glm4rt::QFormat qformat(int fmt) {
  GLM4RT_CHECK(fmt >= 0 && fmt <= 2) << "unknown quantized format " << fmt << " (0 = int8, 1 = int4, 2 = q4k)";
  return static_cast<glm4rt::QFormat>(fmt);
}

void qmatmul(const py::array& x, const py::array& packed, int fmt, int N, const py::object& bias,
             py::array& out) {
  const glm4rt::QFormat f = qformat(fmt);
  expect<float>(x, "x", {-1, -1});
  const int M = static_cast<int>(x.shape(0)), K = static_cast<int>(x.shape(1));
  GLM4RT_CHECK(N > 0 && K > 0) << "qmatmul: empty matrix N=" << N << " K=" << K;
  expect<uint8_t>(packed, "packed weight", {static_cast<py::ssize_t>(glm4rt::q_packed_bytes(f, N, K))});
  const float* bias_ptr = optional_bias(bias, N);
  expect<float>(out, "out", {M, N}, true);
  const float* xp = static_cast<const float*>(x.data());
  const uint8_t* wp = static_cast<const uint8_t*>(packed.data());
  float* yp = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  glm4rt::qmatmul(f, xp, M, K, wp, N, bias_ptr, yp);
}

void quantize_pack(const py::array& w, int fmt, int N, int row0, py::array& packed, const py::object& importance) {
  const glm4rt::QFormat f = qformat(fmt);
  GLM4RT_CHECK(w.ndim() == 2) << "weight: expected [rows, K], got shape " << shape_str(w);
  const int n_rows = static_cast<int>(w.shape(0)), K = static_cast<int>(w.shape(1));
  const bool bf16 = w.dtype().equal(py::dtype::of<uint16_t>());
  if (bf16)
    expect<uint16_t>(w, "weight (bf16 bits)", {n_rows, K});
  else
    expect<float>(w, "weight", {n_rows, K});
  GLM4RT_CHECK(K > 0 && N > 0 && row0 >= 0 && row0 % glm4rt::kQGroupRows == 0 && row0 + n_rows <= N &&
               (n_rows % glm4rt::kQGroupRows == 0 || row0 + n_rows == N))
      << "rows [" << row0 << ", " << row0 + n_rows << ") of " << N
      << ": a chunk must start at a multiple of 16 rows and hold whole groups (or end the matrix)";
  expect<uint8_t>(packed, "packed", {static_cast<py::ssize_t>(glm4rt::q_packed_bytes(f, N, K))}, true);
  const float* wf = bf16 ? nullptr : static_cast<const float*>(w.data());
  const uint16_t* wb = bf16 ? static_cast<const uint16_t*>(w.data()) : nullptr;
  uint8_t* pp = static_cast<uint8_t*>(packed.mutable_data());
  const float* ip = nullptr;
  py::array imp;
  if (!importance.is_none()) {
    GLM4RT_CHECK(f == glm4rt::QFormat::Q4K) << "importance weights are used by q4k only";
    imp = importance.cast<py::array>();
    expect<float>(imp, "importance", {K});
    ip = static_cast<const float*>(imp.data());
    for (int k = 0; k < K; ++k)
      GLM4RT_CHECK(std::isfinite(ip[k]) && ip[k] >= 0.0f) << "importance[" << k << "] must be finite and >= 0, got " << ip[k];
  }
  py::gil_scoped_release release;
  glm4rt::quantize_pack(f, wf, wb, N, K, row0, n_rows, pp, ip);
}

py::array_t<float> dequantize(const py::array& packed, int fmt, int N, int K) {
  const glm4rt::QFormat f = qformat(fmt);
  GLM4RT_CHECK(N > 0 && K > 0) << "dequantize: empty matrix N=" << N << " K=" << K;
  expect<uint8_t>(packed, "packed", {static_cast<py::ssize_t>(glm4rt::q_packed_bytes(f, N, K))});
  py::array_t<float> out({N, K});
  glm4rt::dequantize_packed(f, static_cast<const uint8_t*>(packed.data()), N, K, out.mutable_data());
  return out;
}

py::tuple quantize_acts(const py::array& x) {
  expect<float>(x, "x", {-1, -1});
  const int M = static_cast<int>(x.shape(0)), K = static_cast<int>(x.shape(1));
  const int nb = glm4rt::q_blocks(K);
  py::array_t<int8_t> q({M, nb * glm4rt::kQBlock});
  py::array_t<float> scale({M, nb});
  py::array_t<int32_t> sum({M, nb});
  glm4rt::quantize_acts(static_cast<const float*>(x.data()), M, K, q.mutable_data(), scale.mutable_data(),
                        sum.mutable_data());
  return py::make_tuple(q, scale, sum);
}

size_t packed_bytes(int fmt, int N, int K) {
  GLM4RT_CHECK(N > 0 && K > 0) << "packed_bytes: empty matrix N=" << N << " K=" << K;
  return glm4rt::q_packed_bytes(qformat(fmt), N, K);
}

void rms_norm(const py::array& x, const py::array& weight, float eps, py::array& out) {
  expect<float>(x, "x", {-1, -1});
  const int M = static_cast<int>(x.shape(0)), H = static_cast<int>(x.shape(1));
  expect<float>(weight, "weight", {H});
  expect<float>(out, "out", {M, H}, true);
  GLM4RT_CHECK(eps >= 0.0f) << "eps must be >= 0, got " << eps;
  const float* xp = static_cast<const float*>(x.data());
  const float* wp = static_cast<const float*>(weight.data());
  float* yp = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  glm4rt::rms_norm(xp, wp, yp, M, H, eps);
}

void rotary(py::array& x, const py::array& pos, const py::array& inv_freq, int rot_dim) {
  expect<float>(x, "x", {-1, -1, -1}, true);
  const int T = static_cast<int>(x.shape(0)), nh = static_cast<int>(x.shape(1)),
            d = static_cast<int>(x.shape(2));
  expect<int64_t>(pos, "positions", {T});
  GLM4RT_CHECK(rot_dim >= 0 && rot_dim <= d && rot_dim % 2 == 0)
      << "rot_dim must be even and in [0, head_dim=" << d << "], got " << rot_dim;
  expect<float>(inv_freq, "inv_freq", {rot_dim / 2});
  float* xp = static_cast<float*>(x.mutable_data());
  const int64_t* pp = static_cast<const int64_t*>(pos.data());
  const float* fp = static_cast<const float*>(inv_freq.data());
  py::gil_scoped_release release;
  glm4rt::rotary_interleaved(xp, T, nh, d, pp, fp, rot_dim);
}

void silu_mul(const py::array& gate_up, py::array& out) {
  expect<float>(gate_up, "gate_up", {-1, -1});
  const int M = static_cast<int>(gate_up.shape(0)), I2 = static_cast<int>(gate_up.shape(1));
  GLM4RT_CHECK(I2 % 2 == 0) << "gate_up: last dimension must be even (gate then up), got " << I2;
  expect<float>(out, "out", {M, I2 / 2}, true);
  const float* gp = static_cast<const float*>(gate_up.data());
  float* op = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  glm4rt::silu_mul(gp, op, M, I2 / 2);
}

// The head geometry both attention entry points share.
void check_heads(const AttentionArgs& a) {
  GLM4RT_CHECK(a.head_dim >= 1 && a.head_dim <= glm4rt::kMaxHeadDim)
      << "head_dim must be in [1, " << glm4rt::kMaxHeadDim << "] (the attention kernels' limit), got " << a.head_dim;
  GLM4RT_CHECK(a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0)
      << "n_heads (" << a.n_heads << ") must be a multiple of n_kv_heads (" << a.n_kv_heads << ")";
}

void attention(const py::array& q, const py::array& k, const py::array& v, int n_keys,
               const py::array& q_pos, const py::object& key_mask, float scale, py::array& out,
               const py::object& probs) {
  expect<float>(q, "q", {-1, -1, -1, -1});
  AttentionArgs a{};
  a.batch = static_cast<int>(q.shape(0));
  a.n_queries = static_cast<int>(q.shape(1));
  a.n_heads = static_cast<int>(q.shape(2));
  a.head_dim = static_cast<int>(q.shape(3));
  expect<float>(k, "k", {a.batch, -1, -1, a.head_dim});
  a.n_kv_heads = static_cast<int>(k.shape(1));
  a.capacity = static_cast<int>(k.shape(2));
  expect<float>(v, "v", {a.batch, a.n_kv_heads, a.capacity, a.head_dim});
  check_heads(a);
  GLM4RT_CHECK(n_keys > 0 && n_keys <= a.capacity)
      << "n_keys must be in [1, capacity=" << a.capacity << "], got " << n_keys;
  a.n_keys = n_keys;
  expect<int64_t>(q_pos, "q_pos", {a.n_queries});
  const int64_t* qp = static_cast<const int64_t*>(q_pos.data());
  for (int t = 0; t < a.n_queries; ++t)
    GLM4RT_CHECK(qp[t] >= 0 && qp[t] < n_keys)
        << "q_pos[" << t << "] = " << qp[t] << " is outside the " << n_keys << " keys";
  if (!key_mask.is_none()) {
    py::array m = key_mask.cast<py::array>();
    expect<uint8_t>(m, "key_mask", {a.batch, n_keys});
    a.key_mask = static_cast<const uint8_t*>(m.data());
  }
  expect<float>(out, "out", {a.batch, a.n_queries, a.n_heads, a.head_dim}, true);
  if (!probs.is_none()) {
    py::array p = probs.cast<py::array>();
    expect<float>(p, "probs", {a.batch, a.n_heads, a.n_queries, n_keys}, true);
    a.probs = static_cast<float*>(p.mutable_data());
  }
  a.q = static_cast<const float*>(q.data());
  a.k = static_cast<const float*>(k.data());
  a.v = static_cast<const float*>(v.data());
  a.q_pos = qp;
  a.out = static_cast<float*>(out.mutable_data());
  a.scale = scale;
  py::gil_scoped_release release;
  glm4rt::attention(a);
}

// Query rows of several cache sequences (AttentionArgs.q_slot, ops.h).
void attention_rows(const py::array& q, const py::array& k, const py::array& v, const py::array& q_slot,
                    const py::array& q_pos, float scale, py::array& out) {
  expect<float>(q, "q", {-1, -1, -1});
  AttentionArgs a{};
  a.batch = 1;
  a.n_queries = static_cast<int>(q.shape(0));
  a.n_heads = static_cast<int>(q.shape(1));
  a.head_dim = static_cast<int>(q.shape(2));
  expect<float>(k, "k", {-1, -1, -1, a.head_dim});
  const int n_seqs = static_cast<int>(k.shape(0));
  a.n_kv_heads = static_cast<int>(k.shape(1));
  a.capacity = static_cast<int>(k.shape(2));
  expect<float>(v, "v", {n_seqs, a.n_kv_heads, a.capacity, a.head_dim});
  check_heads(a);
  GLM4RT_CHECK(a.capacity > 0) << "the cache has no room (capacity 0)";
  a.n_keys = a.capacity;
  expect<int64_t>(q_slot, "q_slot", {a.n_queries});
  expect<int64_t>(q_pos, "q_pos", {a.n_queries});
  const int64_t* slot = static_cast<const int64_t*>(q_slot.data());
  const int64_t* qp = static_cast<const int64_t*>(q_pos.data());
  for (int t = 0; t < a.n_queries; ++t) {
    GLM4RT_CHECK(slot[t] >= 0 && slot[t] < n_seqs)
        << "q_slot[" << t << "] = " << slot[t] << " is outside the " << n_seqs << " cache sequences";
    GLM4RT_CHECK(qp[t] >= 0 && qp[t] < a.capacity)
        << "q_pos[" << t << "] = " << qp[t] << " is outside the cache capacity " << a.capacity;
  }
  expect<float>(out, "out", {a.n_queries, a.n_heads, a.head_dim}, true);
  a.q = static_cast<const float*>(q.data());
  a.k = static_cast<const float*>(k.data());
  a.v = static_cast<const float*>(v.data());
  a.q_pos = qp;
  a.q_slot = slot;
  a.out = static_cast<float*>(out.mutable_data());
  a.scale = scale;
  py::gil_scoped_release release;
  glm4rt::attention(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "glm4rt C++ kernels (import through glm4rt.ops)";
  glm4rt::read_settings();  // GLM4RT_ISA, GLM4RT_DEV_*: a bad value fails the import with its message

  m.def("matmul", &matmul, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"),
        "out[M, N] = x[M, K] @ weight[N, K]^T (+ bias); weight fp32 or bf16 bits (uint16).");
  m.def("qmatmul", &qmatmul, py::arg("x"), py::arg("packed"), py::arg("fmt"), py::arg("n"),
        py::arg("bias"), py::arg("out"), "out[M, N] = x[M, K] @ W^T (+ bias), W packed int8/int4/q4k.");
  m.def("quantize_pack", &quantize_pack, py::arg("weight"), py::arg("fmt"), py::arg("n"),
        py::arg("row0"), py::arg("packed"), py::arg("importance") = py::none(),
        "Quantize rows row0.. of an [N, K] matrix into packed (q4k: optional importance [K]).");
  m.def("dequantize", &dequantize, py::arg("packed"), py::arg("fmt"), py::arg("n"), py::arg("k"));
  m.def("quantize_acts", &quantize_acts, py::arg("x"));
  m.def("packed_bytes", &packed_bytes, py::arg("fmt"), py::arg("n"), py::arg("k"));
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"));
  m.def("rotary", &rotary, py::arg("x"), py::arg("positions"), py::arg("inv_freq"),
        py::arg("rot_dim"), "Interleaved partial rotary, in place on x[n_tokens, n_heads, d].");
  m.def("silu_mul", &silu_mul, py::arg("gate_up"), py::arg("out"));
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("n_keys"),
        py::arg("q_pos"), py::arg("key_mask"), py::arg("scale"), py::arg("out"),
        py::arg("probs"));
  m.def("attention_rows", &attention_rows, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_slot"),
        py::arg("q_pos"), py::arg("scale"), py::arg("out"));
  m.def("stream_read", [](const py::array& a) {
    expect<uint8_t>(a, "data", {-1});
    const uint8_t* p = static_cast<const uint8_t*>(a.data());
    const size_t n = static_cast<size_t>(a.shape(0));
    py::gil_scoped_release release;
    return glm4rt::stream_read(p, n);
  }, py::arg("data"), "Read every byte with the kernel threads (memory bandwidth probe); returns a checksum.");
  m.def("supported_isas", &glm4rt::supported_isas);
  m.def("x86_cpuid", [] {
    const glm4rt::X86Cpuid c = glm4rt::x86_cpuid();
    py::dict d;
    d["leaf1_ecx"] = c.leaf1_ecx, d["leaf7_ebx"] = c.leaf7_ebx, d["leaf7_ecx"] = c.leaf7_ecx;
    d["leaf7_edx"] = c.leaf7_edx, d["leaf7_1_eax"] = c.leaf7_1_eax, d["xcr0"] = c.xcr0;
    return d;
  }, "This CPU's CPUID feature words and XCR0 (zeros on other architectures).");
  m.def("x86_isas_for", [](unsigned int leaf1_ecx, unsigned int leaf7_ebx, unsigned int leaf7_ecx,
                           unsigned int leaf7_edx, unsigned int leaf7_1_eax, unsigned long long xcr0,
                           bool amx_granted) {
    return glm4rt::x86_isas_for({leaf1_ecx, leaf7_ebx, leaf7_ecx, leaf7_edx, leaf7_1_eax, xcr0}, amx_granted);
  }, py::arg("leaf1_ecx"), py::arg("leaf7_ebx"), py::arg("leaf7_ecx"), py::arg("leaf7_edx"),
     py::arg("leaf7_1_eax"), py::arg("xcr0"), py::arg("amx_granted"),
     "The kernel sets supported_isas() would list for these CPUID / XCR0 values (tests of the OS checks).");
  m.attr("AMX_MIN_TOKENS_QUANT") = glm4rt::kAmxMinTokensQuant;
  m.attr("AMX_MIN_QUERIES_ATTN") = glm4rt::kAmxMinQueriesAttn;
  m.attr("AMX_MIN_KEYS_ATTN") = glm4rt::kAmxMinKeysAttn;
  m.def("set_isa", &glm4rt::set_isa, py::arg("name"));
  m.def("active_isa", &glm4rt::active_isa);
  m.def("set_num_threads", &glm4rt::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &glm4rt::get_num_threads);
  m.def("num_threads_is_default", &glm4rt::num_threads_is_default);
  m.def("set_thread_cap", &glm4rt::set_thread_cap, py::arg("n"));
  m.def("set_batch_invariant", &glm4rt::set_batch_invariant, py::arg("on"));
  m.def("batch_invariant", &glm4rt::batch_invariant);
}
