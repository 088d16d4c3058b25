import VMTemplateOS
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A QMP socket bound and listening before QEMU starts, handed to QEMU as an open descriptor
/// (`-chardev socket,fd=3,server=on`), as libvirt does for its monitors.
///
/// A client can then connect the instant QEMU is spawned: the connection waits in the listen
/// backlog until QEMU's monitor accepts it and greets, so nobody polls for the socket file to
/// appear (which costs up to a retry interval of latency per start and, with many clones starting
/// at once, CPU), and a stale socket file cannot be mistaken for a live QEMU.
public final class QMPListener: Sendable {
    /// The descriptor number QEMU finds the listening socket under.
    public static let inheritedDescriptor: Int32 = 3

    public let path: String
    /// The listening socket in this process (close-on-exec: only the spawned QEMU gets it, as fd 3).
    public let descriptor: Int32

    /// Binds and listens on `path`, replacing a stale socket file left there.
    public init(path: String) throws {
        guard let address = UnixSocketAddress(path: path) else {
            throw VMTemplateError(.invalidArgument, "socket path '\(path)' is \(path.utf8.count) bytes, over the \(UnixSocketAddress.maxPathBytes) allowed for Unix sockets: use a store with a shorter path (--store).")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            throw VMTemplateError(.ioError, "cannot create the QMP socket for '\(path)': \(errnoText()).")
        }
        // Only a socket file is ever replaced: anything else at the path is an error below.
        var status = stat()
        if lstat(path, &status) == 0, (status.st_mode & S_IFMT) == S_IFSOCK { unlink(path) }
        // The monitor commands the VM: the socket is its owner's alone (connecting needs write
        // permission on the socket file). umask keeps it so from the moment it exists.
        let previousMask = umask(0o077)
        let bound = address.withSockaddr { bind(fd, $0, $1) }
        umask(previousMask)
        // QEMU's monitor serves one client at a time; the backlog holds the others until then.
        guard bound == 0, listen(fd, 16) == 0 else {
            let code = errno
            close(fd)
            throw VMTemplateError(.ioError, "cannot listen on the QMP socket '\(path)': \(errnoText(code)). Check that this user may write to its directory.")
        }
        self.path = path
        self.descriptor = fd
    }

    deinit {
        close(descriptor)
    }
}
