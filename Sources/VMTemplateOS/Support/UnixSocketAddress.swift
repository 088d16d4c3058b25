#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The `sockaddr_un` for a filesystem path: the one place it is filled in and its length checked.
package struct UnixSocketAddress: Sendable {
    /// The longest path `sun_path` holds, without its terminating NUL (107 on Linux).
    package static let maxPathBytes = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    private var address = sockaddr_un()

    /// nil when `path` is empty or longer than `maxPathBytes`.
    package init?(path: String) {
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count <= Self.maxPathBytes else { return nil }
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
    }

    /// A blocking, close-on-exec stream socket connected to this address, or the failed call.
    package func connectStream() -> Result<Int32, SystemCallError> {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(SystemCallError("socket")) }
        guard withSockaddr({ connect(fd, $0, $1) }) == 0 else {
            let code = errno
            close(fd)
            return .failure(SystemCallError("connect", code: code))
        }
        return .success(fd)
    }

    /// Calls `body` (`bind`, `connect`) with the address as a `sockaddr` and its length.
    package func withSockaddr<Result>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> Result) -> Result {
        withUnsafePointer(to: address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}
