// Status and Result<T>: how trove reports what can go wrong at run time (bad input, I/O,
// corruption). Broken invariants use TROVE_CHECK (base/check.h) instead. No exceptions cross
// a library API.
//
// A Status carries a code and a message that names what was wrong: the file, the field, the
// value, and where possible what to do next. Callers add context as the error travels up:
//   return s.with_context("reading " + path);
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "base/check.h"

namespace trove {

class [[nodiscard]] Status {
 public:
  enum class Code : uint8_t {
    kOk = 0,
    kInvalidArgument,    // the caller's input is wrong (shape, dtype, flag, budget)
    kNotFound,           // a file, tensor or layer that should exist does not
    kCorruption,         // stored bytes fail a checksum or a structural check
    kIOError,            // the OS said no (errno in the message)
    kNotSupported,       // a valid request this build or version cannot serve
    kOutOfRange,         // a read past the end, a value outside a format's range
    kResourceExhausted,  // memory, disk or a budget is too small
    kAborted,            // the user interrupted long work
  };

  Status() = default;  // OK
  static Status ok_status() { return Status(); }
  static Status invalid_argument(std::string msg) {
    return {Code::kInvalidArgument, std::move(msg)};
  }
  static Status not_found(std::string msg) { return {Code::kNotFound, std::move(msg)}; }
  static Status corruption(std::string msg) { return {Code::kCorruption, std::move(msg)}; }
  static Status io_error(std::string msg) { return {Code::kIOError, std::move(msg)}; }
  static Status not_supported(std::string msg) { return {Code::kNotSupported, std::move(msg)}; }
  static Status out_of_range(std::string msg) { return {Code::kOutOfRange, std::move(msg)}; }
  static Status resource_exhausted(std::string msg) {
    return {Code::kResourceExhausted, std::move(msg)};
  }
  static Status aborted(std::string msg) { return {Code::kAborted, std::move(msg)}; }
  // An I/O error from errno: "<what>: <strerror(err)>".
  static Status from_errno(std::string_view what, int err);

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  bool is_corruption() const { return code_ == Code::kCorruption; }
  bool is_not_found() const { return code_ == Code::kNotFound; }
  bool is_invalid_argument() const { return code_ == Code::kInvalidArgument; }
  bool is_io_error() const { return code_ == Code::kIOError; }

  // "Corruption: <message>"; "OK" for success.
  std::string to_string() const;
  // The same code with "<context>: " prepended to the message. OK stays OK.
  Status with_context(std::string_view context) const;

  static const char* code_name(Code code);

 private:
  Status(Code code, std::string msg) : code_(code), message_(std::move(msg)) {}
  Code code_ = Code::kOk;
  std::string message_;
};

// Result<T> holds either a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT: implicit by design
    TROVE_CHECK_MSG(!std::get<Status>(v_).ok(), "Result constructed from an OK Status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  // REQUIRES: ok().
  T& value() & {
    TROVE_CHECK_MSG(ok(), "Result::value() on error: %s", status().to_string().c_str());
    return std::get<T>(v_);
  }
  const T& value() const& {
    TROVE_CHECK_MSG(ok(), "Result::value() on error: %s", status().to_string().c_str());
    return std::get<T>(v_);
  }
  T&& value() && {
    TROVE_CHECK_MSG(ok(), "Result::value() on error: %s", status().to_string().c_str());
    return std::get<T>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace trove

#define TROVE_STATUS_CONCAT_INNER_(a, b) a##b
#define TROVE_STATUS_CONCAT_(a, b) TROVE_STATUS_CONCAT_INNER_(a, b)

// Returns the Status of `expr` (a Status or Result) from the enclosing function if not OK.
#define TROVE_RETURN_IF_ERROR(expr)                                              \
  do {                                                                           \
    /* A copy: `expr` may be a reference into a temporary, e.g. f().status(). */ \
    ::trove::Status trove_status_tmp_ = ::trove::internal::to_status((expr));    \
    if (!trove_status_tmp_.ok()) return trove_status_tmp_;                       \
  } while (0)

// TROVE_ASSIGN_OR_RETURN(auto x, make_x()): unwraps a Result or returns its error.
#define TROVE_ASSIGN_OR_RETURN(lhs, expr) \
  TROVE_ASSIGN_OR_RETURN_IMPL_(TROVE_STATUS_CONCAT_(trove_result_, __LINE__), lhs, expr)
#define TROVE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()

namespace trove::internal {
inline Status to_status(const Status& s) {
  return s;
}
template <typename T>
Status to_status(const Result<T>& r) {
  return r.status();
}
}  // namespace trove::internal
