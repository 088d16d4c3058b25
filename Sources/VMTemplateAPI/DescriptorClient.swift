import CLinuxHost
import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A client of `serve`'s descriptor socket (``DescriptorSocket``): deposits one descriptor and
/// returns its token. The server is checked as ``UnixHTTPClient`` checks it before anything is
/// sent: a descriptor handed to whoever listens on the path would be theirs.
package struct DescriptorClient: Sendable {
    package let socketPath: String
    package let trustedServers: Set<uid_t>

    package init(socketPath: String, alsoTrusting: uid_t? = nil) {
        self.socketPath = socketPath
        trustedServers = Set([0, geteuid()] + (alsoTrusting.map { [$0] } ?? []))
    }

    /// Deposits `descriptor` (which stays this process's too); `kind`, when given, is checked by
    /// the server.
    package func deposit(_ descriptor: Int32, kind: GivenDescriptor.Kind? = nil, timeout: Duration = .seconds(10)) throws -> Deposited {
        guard let address = UnixSocketAddress(path: socketPath) else {
            throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(socketPath))' is too long for a Unix socket.")
        }
        let fd: Int32
        switch address.connect(type: Int32(SOCK_SEQPACKET.rawValue), until: .now + timeout) {
        case .success(let connected):
            fd = connected
        case .failure(let error):
            switch error.code {
            case EACCES, EPERM:
                throw VMTemplateError(.permissionDenied, "may not connect to '\(TerminalText.escape(socketPath))': ask the store's owner to run 'vmtemplate serve --socket-group GROUP' with a group you are in.", cause: error)
            case ENOENT, ECONNREFUSED:
                throw VMTemplateError(.notFound, "no server answers on '\(TerminalText.escape(socketPath))': start 'vmtemplate serve' for this store (it makes the descriptor socket beside its API socket), or pass --socket.", cause: error)
            default:
                throw VMTemplateError(.ioError, "cannot connect to '\(TerminalText.escape(socketPath))': \(errnoText(error.code)).", cause: error)
            }
        }
        defer { close(fd) }
        try UnixHTTPClient.checkServer(fd, of: socketPath, trusting: trustedServers)
        let message = Data((kind.map { #"{"kind":"\#($0.rawValue)"}"# } ?? "{}").utf8)
        let sent = message.withUnsafeBytes { clinuxhost_send_with_fd(fd, $0.baseAddress, UInt($0.count), descriptor) }
        guard sent == message.count else {
            throw VMTemplateError(.ioError, "cannot send the descriptor to '\(TerminalText.escape(socketPath))': \(errnoText(Int32(-sent))).", cause: SystemCallError("sendmsg", code: Int32(-sent)))
        }
        var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let milliseconds = Int32(clamping: timeout.components.seconds * 1000)
        guard poll(&entry, 1, milliseconds) == 1 else {
            throw VMTemplateError(.timeout, "the server on '\(TerminalText.escape(socketPath))' did not answer within \(timeout.shortText).")
        }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let received = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        guard received > 0 else {
            throw VMTemplateError(.ioError, "the server on '\(TerminalText.escape(socketPath))' closed the connection without an answer.")
        }
        let answer = Data(buffer[0..<received])
        if let failure = try? JSONCoding.decoder().decode(ErrorBody.self, from: answer) {
            throw VMTemplateError(failure.code ?? .internalError, failure.error.message)
        }
        do {
            return try JSONCoding.decoder().decode(Deposited.self, from: answer)
        } catch {
            throw VMTemplateError(.internalError, "the server's answer is not a deposit: \(JSONErrorText.describe(error)).")
        }
    }
}
