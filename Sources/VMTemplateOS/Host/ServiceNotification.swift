#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// systemd's readiness protocol (`sd_notify(3)`, `Type=notify`): one datagram to
/// `$NOTIFY_SOCKET`. Written here rather than linked from libsystemd: it is one `sendto`.
package enum ServiceNotification {
    /// Sends `READY=1` (and a status line) when the service manager asked for it; nothing
    /// otherwise. Returns whether it was sent. systemd's own socket is a path
    /// (`/run/systemd/notify`); an abstract one (`@name`) is not used.
    @discardableResult
    package static func ready(status: String, environment: [String: String]) -> Bool {
        guard let path = environment["NOTIFY_SOCKET"], path.hasPrefix("/"), let address = UnixSocketAddress(path: path) else { return false }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        // Bounded and on one line: a status is shown by systemctl as it is.
        let line = String(status.prefix(200).map { $0 == "\n" ? " " : $0 })
        let message = Array("READY=1\nSTATUS=\(line)\n".utf8)
        let sent = address.withSockaddr { sendto(fd, message, message.count, Int32(MSG_NOSIGNAL), $0, $1) }
        return sent == message.count
    }
}
