// Cryptographically secure random integers for TensorFlow, as a custom op library.
//
// Ops:
//   HelpersSecureSeed           -> int32[8]: a 256-bit seed from the OS (getentropy).
//   HelpersSeededRandomUniform  -> uniform integers in [minval, maxval), a pure
//                                  function of (seed, shape, minval, maxval).
//   HelpersRandomUniform        -> the same sampler under a fresh OS seed per run.
//   HelpersChaCha20Block        -> one raw ChaCha20 block; only for tests of the
//                                  core against the RFC 8439 vectors.
//
// The keystream is ChaCha20 (RFC 8439): key = the 8 seed words, nonce = 0,
// block counter from 0. It is read as little-endian uint64 words, and each
// output comes from rejection sampling, so there is no modulo bias.

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

#include <unistd.h>  // getentropy() on Linux (glibc >= 2.25)
#if defined(__APPLE__)
#include <sys/random.h>  // getentropy() on macOS
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/tensor_util.h"

namespace helpers_secure_random {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::TensorShapeUtils;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;
namespace errors = tensorflow::errors;

constexpr int kSeedWords = 8;   // 256-bit key
constexpr int kNonceWords = 3;  // 96-bit nonce
constexpr int kBlockWords = 16; // 512-bit block
constexpr uint64_t kMaxBlocks = uint64_t{1} << 32;  // the 32-bit counter's range

// Overwrites secrets so they do not linger in freed stack or heap memory. The
// volatile pointer keeps the compiler from dropping the "dead" stores.
void SecureZero(void* data, size_t size) {
  volatile unsigned char* p = static_cast<volatile unsigned char*>(data);
  while (size--) *p++ = 0;
}

// ---------------------------------------------------------------------------
// ChaCha20 block function, RFC 8439 section 2.3.

inline uint32_t RotateLeft(uint32_t v, int n) { return (v << n) | (v >> (32 - n)); }

inline void QuarterRound(uint32_t* x, int a, int b, int c, int d) {
  x[a] += x[b]; x[d] ^= x[a]; x[d] = RotateLeft(x[d], 16);
  x[c] += x[d]; x[b] ^= x[c]; x[b] = RotateLeft(x[b], 12);
  x[a] += x[b]; x[d] ^= x[a]; x[d] = RotateLeft(x[d], 8);
  x[c] += x[d]; x[b] ^= x[c]; x[b] = RotateLeft(x[b], 7);
}

// Writes the 16 keystream words of one block (as 32-bit words; serialise them
// little-endian to get the RFC's byte order).
void ChaCha20Block(const uint32_t key[kSeedWords], uint32_t counter,
                   const uint32_t nonce[kNonceWords], uint32_t out[kBlockWords]) {
  uint32_t state[kBlockWords];
  // "expand 32-byte k", the RFC's constants.
  state[0] = 0x61707865u;
  state[1] = 0x3320646eu;
  state[2] = 0x79622d32u;
  state[3] = 0x6b206574u;
  for (int i = 0; i < kSeedWords; ++i) state[4 + i] = key[i];
  state[12] = counter;
  for (int i = 0; i < kNonceWords; ++i) state[13 + i] = nonce[i];

  uint32_t x[kBlockWords];
  std::memcpy(x, state, sizeof(x));
  for (int round = 0; round < 20; round += 2) {
    // Column round.
    QuarterRound(x, 0, 4, 8, 12);
    QuarterRound(x, 1, 5, 9, 13);
    QuarterRound(x, 2, 6, 10, 14);
    QuarterRound(x, 3, 7, 11, 15);
    // Diagonal round.
    QuarterRound(x, 0, 5, 10, 15);
    QuarterRound(x, 1, 6, 11, 12);
    QuarterRound(x, 2, 7, 8, 13);
    QuarterRound(x, 3, 4, 9, 14);
  }
  for (int i = 0; i < kBlockWords; ++i) out[i] = x[i] + state[i];

  // Both arrays hold key material.
  SecureZero(state, sizeof(state));
  SecureZero(x, sizeof(x));
}

// The keystream of one key (nonce zero) read as little-endian uint64 words.
// Wipes the key and buffered keystream when it goes out of scope.
class Keystream {
 public:
  explicit Keystream(const uint32_t key[kSeedWords]) {
    std::memcpy(key_, key, sizeof(key_));
  }
  ~Keystream() {
    SecureZero(key_, sizeof(key_));
    SecureZero(buffer_, sizeof(buffer_));
  }
  Keystream(const Keystream&) = delete;
  Keystream& operator=(const Keystream&) = delete;

  // Sets *word to the next keystream word; false once the 32-bit block
  // counter is used up (the same key must never reuse a counter value).
  bool Next(uint64_t* word) {
    if (position_ == kBlockWords) {
      if (next_block_ >= kMaxBlocks) return false;
      ChaCha20Block(key_, static_cast<uint32_t>(next_block_), kZeroNonce, buffer_);
      ++next_block_;
      position_ = 0;
    }
    // Bytes 8k..8k+7 of the block, little-endian = word 2k low, word 2k+1 high.
    *word = uint64_t{buffer_[position_]} | (uint64_t{buffer_[position_ + 1]} << 32);
    position_ += 2;
    return true;
  }

 private:
  static constexpr uint32_t kZeroNonce[kNonceWords] = {0, 0, 0};
  uint32_t key_[kSeedWords];
  uint32_t buffer_[kBlockWords] = {};
  int position_ = kBlockWords;  // empty: the first Next() computes block 0
  uint64_t next_block_ = 0;
};

// Fills out[0..n) with uniform values in [minval, maxval) drawn from the
// keystream of `key`. Requires minval < maxval.
template <typename T>
absl::Status SampleUniform(const uint32_t key[kSeedWords], T minval, T maxval,
                           T* out, int64_t n) {
  // Unsigned arithmetic: wraps instead of overflowing, so even the full int64
  // range (2^64 - 1) is representable.
  const uint64_t low = static_cast<uint64_t>(static_cast<int64_t>(minval));
  const uint64_t range = static_cast<uint64_t>(static_cast<int64_t>(maxval)) - low;
  // 2^64 mod range. Words at or above 2^64 - rem would favour small
  // remainders, so they are rejected; rem == 0 (a power of two) rejects nothing.
  const uint64_t rem = (0 - range) % range;
  const uint64_t limit = 0 - rem;  // 2^64 - rem, meaningful only when rem != 0

  Keystream stream(key);
  for (int64_t i = 0; i < n; ++i) {
    uint64_t w;
    do {
      if (!stream.Next(&w)) {
        return errors::ResourceExhausted(
            "secure random: the ChaCha20 keystream for one seed ran out (2^32 "
            "blocks); ask for fewer values per call");
      }
    } while (rem != 0 && w >= limit);
    // Modular wrap back into T is what we want (minval + offset < maxval).
    out[i] = static_cast<T>(static_cast<int64_t>(low + w % range));
  }
  return absl::OkStatus();
}

// Fills `seed` with 256 bits from the operating system's CSPRNG.
absl::Status OsSeed(uint32_t seed[kSeedWords]) {
  // getentropy() returns at most 256 bytes per call; we need 32.
  static_assert(sizeof(uint32_t) * kSeedWords <= 256, "getentropy limit");
  if (getentropy(seed, sizeof(uint32_t) * kSeedWords) != 0) {
    return errors::Unavailable("secure random: getentropy() failed: ",
                               std::strerror(errno));
  }
  return absl::OkStatus();
}

// Reads and checks the scalar bounds and the output shape shared by the
// uniform ops; allocates the output.
template <typename T>
absl::Status PrepareUniform(OpKernelContext* ctx, int shape_index, int minval_index,
                            int maxval_index, T* minval, T* maxval, Tensor** output) {
  const Tensor& shape_t = ctx->input(shape_index);
  const Tensor& minval_t = ctx->input(minval_index);
  const Tensor& maxval_t = ctx->input(maxval_index);
  if (!TensorShapeUtils::IsScalar(minval_t.shape())) {
    return errors::InvalidArgument("minval must be a scalar, got shape ",
                                   minval_t.shape().DebugString());
  }
  if (!TensorShapeUtils::IsScalar(maxval_t.shape())) {
    return errors::InvalidArgument("maxval must be a scalar, got shape ",
                                   maxval_t.shape().DebugString());
  }
  *minval = minval_t.scalar<T>()();
  *maxval = maxval_t.scalar<T>()();
  if (!(*minval < *maxval)) {
    // int64_t so int8 bounds print as numbers, not characters.
    return errors::InvalidArgument("need minval < maxval, got minval=",
                                   static_cast<int64_t>(*minval), " and maxval=",
                                   static_cast<int64_t>(*maxval));
  }
  TensorShape shape;
  TF_RETURN_IF_ERROR(tensorflow::tensor::MakeShape(shape_t, &shape));
  return ctx->allocate_output(0, shape, output);
}

// ---------------------------------------------------------------------------
// Kernels.

class SecureSeedOp : public OpKernel {
 public:
  explicit SecureSeedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({kSeedWords}), &output));
    uint32_t seed[kSeedWords];
    absl::Status status = OsSeed(seed);
    if (status.ok()) {
      auto flat = output->flat<int32_t>();
      for (int i = 0; i < kSeedWords; ++i) flat(i) = static_cast<int32_t>(seed[i]);
    }
    SecureZero(seed, sizeof(seed));
    OP_REQUIRES_OK(ctx, status);
  }
};

template <typename T>
class SeededRandomUniformOp : public OpKernel {
 public:
  explicit SeededRandomUniformOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& seed_t = ctx->input(1);
    OP_REQUIRES(ctx, seed_t.dims() == 1 && seed_t.dim_size(0) == kSeedWords,
                errors::InvalidArgument("seed must have shape [8] (256 bits), got ",
                                        seed_t.shape().DebugString()));
    T minval, maxval;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, PrepareUniform<T>(ctx, 0, 2, 3, &minval, &maxval, &output));

    uint32_t key[kSeedWords];
    auto seed = seed_t.flat<int32_t>();
    for (int i = 0; i < kSeedWords; ++i) key[i] = static_cast<uint32_t>(seed(i));
    absl::Status status = SampleUniform<T>(key, minval, maxval,
                                           output->flat<T>().data(),
                                           output->NumElements());
    SecureZero(key, sizeof(key));
    OP_REQUIRES_OK(ctx, status);
  }
};

template <typename T>
class RandomUniformOp : public OpKernel {
 public:
  explicit RandomUniformOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    T minval, maxval;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, PrepareUniform<T>(ctx, 0, 1, 2, &minval, &maxval, &output));

    uint32_t key[kSeedWords];
    absl::Status status = OsSeed(key);
    if (status.ok()) {
      status = SampleUniform<T>(key, minval, maxval, output->flat<T>().data(),
                                output->NumElements());
    }
    SecureZero(key, sizeof(key));
    OP_REQUIRES_OK(ctx, status);
  }
};

class ChaCha20BlockOp : public OpKernel {
 public:
  explicit ChaCha20BlockOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& key_t = ctx->input(0);
    const Tensor& counter_t = ctx->input(1);
    const Tensor& nonce_t = ctx->input(2);
    OP_REQUIRES(ctx, key_t.dims() == 1 && key_t.dim_size(0) == kSeedWords,
                errors::InvalidArgument("key must have shape [8], got ",
                                        key_t.shape().DebugString()));
    OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(counter_t.shape()),
                errors::InvalidArgument("counter must be a scalar, got ",
                                        counter_t.shape().DebugString()));
    OP_REQUIRES(ctx, nonce_t.dims() == 1 && nonce_t.dim_size(0) == kNonceWords,
                errors::InvalidArgument("nonce must have shape [3], got ",
                                        nonce_t.shape().DebugString()));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({4 * kBlockWords}), &output));

    uint32_t key[kSeedWords], nonce[kNonceWords], block[kBlockWords];
    for (int i = 0; i < kSeedWords; ++i) key[i] = static_cast<uint32_t>(key_t.flat<int32_t>()(i));
    for (int i = 0; i < kNonceWords; ++i) nonce[i] = static_cast<uint32_t>(nonce_t.flat<int32_t>()(i));
    const uint32_t counter = static_cast<uint32_t>(counter_t.scalar<int32_t>()());
    ChaCha20Block(key, counter, nonce, block);

    // Serialise little-endian, independent of the host's byte order.
    auto bytes = output->flat<uint8_t>();
    for (int i = 0; i < kBlockWords; ++i) {
      for (int b = 0; b < 4; ++b) bytes(4 * i + b) = static_cast<uint8_t>(block[i] >> (8 * b));
    }
    SecureZero(key, sizeof(key));
    SecureZero(block, sizeof(block));
  }
};

// ---------------------------------------------------------------------------
// Registration.

// Output shape = the value of the shape input (unknown dims if not constant).
absl::Status ShapeFromInput0(InferenceContext* c) {
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(0, &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

REGISTER_OP("HelpersSecureSeed")
    .Output("seed: int32")
    .SetIsStateful()  // a new seed per run: never constant-fold or cache it
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(kSeedWords));
      return absl::OkStatus();
    })
    .Doc("A 256-bit seed from the operating system's cryptographic generator.");

REGISTER_OP("HelpersSeededRandomUniform")
    .Input("shape: Tshape")
    .Input("seed: int32")
    .Input("minval: T")
    .Input("maxval: T")
    .Output("output: T")
    .Attr("T: {int8, int16, int32, int64}")
    .Attr("Tshape: {int32, int64} = DT_INT32")
    .SetShapeFn(ShapeFromInput0)
    .Doc("Uniform integers in [minval, maxval), a deterministic function of the "
         "256-bit seed (ChaCha20 keystream with rejection sampling).");

REGISTER_OP("HelpersRandomUniform")
    .Input("shape: Tshape")
    .Input("minval: T")
    .Input("maxval: T")
    .Output("output: T")
    .Attr("T: {int8, int16, int32, int64}")
    .Attr("Tshape: {int32, int64} = DT_INT32")
    .SetIsStateful()  // fresh OS seed on every run
    .SetShapeFn(ShapeFromInput0)
    .Doc("Uniform integers in [minval, maxval) under a fresh OS seed per run.");

REGISTER_OP("HelpersChaCha20Block")
    .Input("key: int32")
    .Input("counter: int32")
    .Input("nonce: int32")
    .Output("block: uint8")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(4 * kBlockWords));
      return absl::OkStatus();
    })
    .Doc("The 64 keystream bytes of one ChaCha20 block (for tests).");

REGISTER_KERNEL_BUILDER(Name("HelpersSecureSeed").Device(DEVICE_CPU), SecureSeedOp);
REGISTER_KERNEL_BUILDER(Name("HelpersChaCha20Block").Device(DEVICE_CPU), ChaCha20BlockOp);

#define HELPERS_REGISTER_UNIFORM(type)                                              \
  REGISTER_KERNEL_BUILDER(                                                          \
      Name("HelpersSeededRandomUniform").Device(DEVICE_CPU).TypeConstraint<type>("T"), \
      SeededRandomUniformOp<type>);                                                 \
  REGISTER_KERNEL_BUILDER(                                                          \
      Name("HelpersRandomUniform").Device(DEVICE_CPU).TypeConstraint<type>("T"),    \
      RandomUniformOp<type>)

HELPERS_REGISTER_UNIFORM(int8_t);
HELPERS_REGISTER_UNIFORM(int16_t);
HELPERS_REGISTER_UNIFORM(int32_t);
HELPERS_REGISTER_UNIFORM(int64_t);

#undef HELPERS_REGISTER_UNIFORM

}  // namespace helpers_secure_random
