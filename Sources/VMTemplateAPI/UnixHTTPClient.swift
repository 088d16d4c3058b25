import CLinuxHost
import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A minimal HTTP/1.1 client for the API's Unix socket: one request per connection
/// (`Connection: close`), blocking, bounded. For tests, benchmarks and scripts that have no
/// `curl --unix-socket`.
package struct UnixHTTPClient: Sendable {
    package let socketPath: String
    /// The largest response accepted.
    package static let maxResponseBytes = 16 << 20

    /// Who may serve it: root, this user, and `alsoTrusting` (the store's owner, whose server
    /// a member of its socket's group talks to).
    package let trustedServers: Set<uid_t>

    package init(socketPath: String, alsoTrusting: uid_t? = nil) {
        self.socketPath = socketPath
        trustedServers = Set([0, geteuid()] + (alsoTrusting.map { [$0] } ?? []))
    }

    package struct Reply: Sendable {
        package var status: Int
        package var headers: [String: String]
        package var body: Data
    }

    package func request(_ method: String, _ path: String, body: Data? = nil, headers extra: [String: String] = [:], timeout: Duration = .seconds(60)) throws -> Reply {
        guard let address = UnixSocketAddress(path: socketPath) else {
            throw VMTemplateError(.invalidArgument, "'\(socketPath)' is too long for a Unix socket.")
        }
        let fd: Int32
        switch address.connectStream() {
        case .success(let connected):
            fd = connected
        case .failure(let error):
            switch error.code {
            case EACCES, EPERM:
                throw VMTemplateError(.permissionDenied, "may not connect to '\(socketPath)': ask the store's owner to run 'vmtemplate serve --socket-group GROUP' with a group you are in.", cause: error)
            case ENOENT, ECONNREFUSED:
                throw VMTemplateError(.notFound, "no server answers on '\(socketPath)': start 'vmtemplate serve' for this store, or pass --socket.", cause: error)
            default:
                throw VMTemplateError(.ioError, "cannot connect to '\(socketPath)': \(errnoText(error.code)); check that 'vmtemplate serve' runs and answers there.", cause: error)
            }
        }
        defer { close(fd) }
        try checkServer(fd)
        var head = "\(method) \(path) HTTP/1.1\r\nHost: vmtemplate\r\nConnection: close\r\n"
        if let body { head += "Content-Type: application/json\r\nContent-Length: \(body.count)\r\n" }
        for (name, value) in extra.sorted(by: { $0.key < $1.key }) where !(name + value).contains(where: { $0 == "\r" || $0 == "\n" }) {
            head += "\(name): \(value)\r\n"
        }
        let bytes = Array((head + "\r\n").utf8) + Array(body ?? Data())
        var sent = 0
        while sent < bytes.count {
            let count = bytes[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard count > 0 else { throw VMTemplateError(.ioError, "cannot send to '\(socketPath)': \(errnoText()).") }
            sent += count
        }
        let deadline = ContinuousClock.now + timeout
        var response = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard remaining > .zero else { throw VMTemplateError(.timeout, "no complete answer from '\(socketPath)' within \(timeout.shortText).") }
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, Int32(clamping: remaining.components.seconds * 1000 + 1))
            if ready <= 0 { continue }
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            response += chunk[0..<count]
            guard response.count <= Self.maxResponseBytes else { throw VMTemplateError(.invalidState, "the answer from '\(socketPath)' is larger than \(Self.maxResponseBytes) bytes.") }
        }
        return try Self.parse(response)
    }

    /// The server must be one of ``trustedServers`` (its peer credentials, which the kernel fills in at
    /// connect): whoever else listens on the path (a socket swapped in a directory they could
    /// change) gets no request, and its answer is not believed.
    private func checkServer(_ fd: Int32) throws {
        try Self.checkServer(fd, of: socketPath, trusting: trustedServers)
    }

    static func checkServer(_ fd: Int32, of socketPath: String, trusting trustedServers: Set<uid_t>) throws {
        var credentials = clinuxhost_ucred()
        var length = socklen_t(MemoryLayout<clinuxhost_ucred>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0 else {
            throw VMTemplateError(.ioError, "cannot read who serves '\(TerminalText.escape(socketPath))': \(errnoText()).", cause: SystemCallError("getsockopt"))
        }
        guard trustedServers.contains(credentials.uid) else {
            throw VMTemplateError(.permissionDenied, "'\(TerminalText.escape(socketPath))' is served by uid \(credentials.uid), neither root, this user nor the store's owner: not a vmtemplate server to trust; nothing was sent. Check the path and who can change its directories.")
        }
    }

    static func parse(_ response: [UInt8]) throws -> Reply {
        let separator: [UInt8] = [13, 10, 13, 10]
        guard let end = (0...max(0, response.count - 4)).first(where: { Array(response[$0..<min($0 + 4, response.count)]) == separator }) else {
            throw VMTemplateError(.invalidState, "the server's answer has no end of headers.")
        }
        let lines = String(decoding: response[0..<end], as: UTF8.self).components(separatedBy: "\r\n")
        let statusParts = lines.first?.split(separator: " ") ?? []
        guard statusParts.count >= 2, let status = Int(statusParts[1]) else {
            throw VMTemplateError(.invalidState, "the server's answer has no status line.")
        }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var body = Array(response[(end + 4)...])
        if headers["transfer-encoding"]?.lowercased() == "chunked" { body = dechunk(body) }
        return Reply(status: status, headers: headers, body: Data(body))
    }

    static func dechunk(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        var index = 0
        while index < bytes.count {
            guard let lineEnd = (index..<bytes.count - 1).first(where: { bytes[$0] == 13 && bytes[$0 + 1] == 10 }),
                  let size = Int(String(decoding: bytes[index..<lineEnd], as: UTF8.self).split(separator: ";")[0], radix: 16), size > 0 else { break }
            let start = lineEnd + 2
            guard start + size <= bytes.count else { break }
            out += bytes[start..<(start + size)]
            index = start + size + 2
        }
        return out
    }
}
