#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The text of a C `errno` value, e.g. "No space left on device".
func errnoText(_ code: Int32 = errno) -> String {
    String(cString: strerror(code))
}
