import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A clone's control channel: the guest's second serial port, served by QEMU as a Unix socket.
/// The protocol is the guest's own; the built-in busybox guest answers one line per request line
/// (templates/busybox/README.md).
public struct ControlChannel: Sendable {
    public let path: String

    public init(path: String) {
        self.path = path
    }

    /// Sends `line` and returns the guest's one-line reply (without the line ending).
    public func request(_ line: String, timeout: Duration = .seconds(20)) throws -> String {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw VMTemplateError(.ioError, "cannot create a socket: \(errnoText()).") }
        defer { close(fd) }
        guard let address = UnixSocketAddress(path: path) else {
            throw VMTemplateError(.invalidArgument, "control socket path '\(path)' is empty or too long for a Unix socket.")
        }
        let connected = address.withSockaddr { connect(fd, $0, $1) }
        guard connected == 0 else {
            throw VMTemplateError(.ioError, "cannot connect to the control channel '\(path)': \(errnoText()). Is the clone running (vmtemplate list)?")
        }
        let (seconds, attoseconds) = timeout.components
        var limit = timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        let bytes = Array((line + "\n").utf8)
        let written = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard written == bytes.count else {
            throw VMTemplateError(.ioError, "cannot send to the control channel '\(path)': \(errnoText()).")
        }
        var reply: [UInt8] = []
        var byte: UInt8 = 0
        while true {
            let count = read(fd, &byte, 1)
            if count == 1 {
                if byte == 0x0a { break }
                reply.append(byte)
            } else if count < 0 && errno == EINTR {
                continue
            } else if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                throw VMTemplateError(.timeout, "the guest did not answer '\(line)' on '\(path)' within \(timeout).")
            } else {
                throw VMTemplateError(.ioError, "the control channel '\(path)' closed before the guest answered '\(line)'.")
            }
        }
        return String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
