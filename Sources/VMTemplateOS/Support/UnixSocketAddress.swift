import CLinuxHost

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
    /// With a `deadline`, a listener whose backlog is full (a server that stopped accepting) is
    /// tried again until then instead of blocking without end; after it, `EAGAIN`.
    package func connectStream(until deadline: ContinuousClock.Instant? = nil) -> Result<Int32, SystemCallError> {
        connect(type: Int32(SOCK_STREAM.rawValue), until: deadline)
    }

    /// ``connectStream(until:)`` for a socket of another `type` (`SOCK_SEQPACKET`).
    package func connect(type: Int32, until deadline: ContinuousClock.Instant? = nil) -> Result<Int32, SystemCallError> {
        let fd = socket(AF_UNIX, type | Int32(SOCK_CLOEXEC.rawValue) | (deadline == nil ? 0 : Int32(SOCK_NONBLOCK.rawValue)), 0)
        guard fd >= 0 else { return .failure(SystemCallError("socket")) }
        while withSockaddr({ Glibc.connect(fd, $0, $1) }) != 0 {
            let code = errno
            // A Unix socket's non-blocking connect fails with EAGAIN while the backlog is full.
            if code == EINTR || (code == EAGAIN && deadline.map { ContinuousClock.now < $0 } == true) {
                usleep(1000)
                continue
            }
            close(fd)
            return .failure(SystemCallError("connect", code: code))
        }
        if deadline != nil { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) }
        return .success(fd)
    }

    /// `path` connected as ``connectStream(beneath:relativePath:until:)`` when it lies below
    /// `storeRoot` (a store that may be another user's: no link followed), else directly; nil when
    /// `path` cannot be a Unix socket address. What every client of a clone's sockets uses.
    package static func connectStream(path: String, storeRoot: String?, until deadline: ContinuousClock.Instant) -> Result<Int32, SystemCallError>? {
        guard let address = UnixSocketAddress(path: path) else { return nil }
        if let storeRoot, path.hasPrefix(storeRoot + "/") {
            return connectStream(beneath: storeRoot, relativePath: String(path.dropFirst(storeRoot.count + 1)), until: deadline)
        }
        return address.connectStream(until: deadline)
    }

    /// Connects to the socket at `relativePath` below the directory `root`, following no link
    /// anywhere below `root` (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), and refusing
    /// what is not a socket: a directory below `root` that someone else may change cannot point
    /// this process at another socket. The socket is reached through `/proc/self/fd`.
    package static func connectStream(beneath root: String, relativePath: String, until deadline: ContinuousClock.Instant) -> Result<Int32, SystemCallError> {
        let directory = open(root, clinuxhost_o_path() | O_DIRECTORY | O_CLOEXEC)
        guard directory >= 0 else { return .failure(SystemCallError("open", code: errno)) }
        defer { close(directory) }
        let handle = clinuxhost_openat_beneath(directory, relativePath, clinuxhost_o_path() | O_CLOEXEC)
        guard handle >= 0 else { return .failure(SystemCallError("openat2", code: -handle)) }
        defer { close(handle) }
        var info = stat()
        guard fstat(handle, &info) == 0 else { return .failure(SystemCallError("fstat", code: errno)) }
        guard (info.st_mode & S_IFMT) == S_IFSOCK else { return .failure(SystemCallError("connect", code: ENOTSOCK)) }
        guard let address = UnixSocketAddress(path: "/proc/self/fd/\(handle)") else { return .failure(SystemCallError("connect", code: ENAMETOOLONG)) }
        return address.connectStream(until: deadline)
    }

    /// Calls `body` (`bind`, `connect`) with the address as a `sockaddr` and its length.
    package func withSockaddr<Result>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> Result) -> Result {
        withUnsafePointer(to: address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}
