// Error handling for the kernels: a failed check throws (pybind11 turns it into a Python
// ValueError); nothing in csrc/ ever calls exit() or abort().
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace glm4rt {

// Collects a message with operator<< and throws std::invalid_argument when destroyed.
class CheckFailure {
 public:
  CheckFailure(const char* cond, const char* file, int line) {
    stream_ << "glm4rt: check failed (" << cond << ") at " << file << ":" << line << ": ";
  }
  template <typename T>
  CheckFailure& operator<<(const T& value) {
    stream_ << value;
    return *this;
  }
  [[noreturn]] ~CheckFailure() noexcept(false) { throw std::invalid_argument(stream_.str()); }

 private:
  std::ostringstream stream_;
};

}  // namespace glm4rt

// GLM4RT_CHECK(n > 0) << "n must be positive, got " << n;
#define GLM4RT_CHECK(cond) \
  if (cond) {              \
  } else                   \
    ::glm4rt::CheckFailure(#cond, __FILE__, __LINE__)
