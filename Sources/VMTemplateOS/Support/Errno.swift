#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The text of a C `errno` value, e.g. "No space left on device".
package func errnoText(_ code: Int32 = errno) -> String {
    String(cString: strerror(code))
}

/// A failed system call: which call, and its errno. Kept as the cause of a `VMTemplateError`, so
/// the number survives to whoever wants to tell ENOSPC from EACCES.
package struct SystemCallError: Error, Sendable, Equatable, CustomStringConvertible {
    package let call: String
    package let code: Int32

    package init(_ call: String, code: Int32 = errno) {
        self.call = call
        self.code = code
    }

    package var description: String { "\(call): \(errnoText(code)) (errno \(code))" }
}
