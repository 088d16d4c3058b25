#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation
import Synchronization
import VMTemplateOS
import VMTemplateQEMU

/// A scripted QMP server on a real Unix socket, standing in for QEMU in unit tests.
///
/// It sends a greeting to each client, answers `qmp_capabilities` itself, records every request,
/// and answers everything else as `script` says. Requests are handled one at a time on the
/// server's own thread, in arrival order, like QEMU's monitor does.
final class StubQMPServer: Sendable {
    /// A request as the server received it.
    struct Request: Sendable, Equatable {
        let command: String
        let arguments: JSONValue?
        let id: JSONValue?

        /// The id as JSON text, for hand-written `.raw` replies.
        var idJSON: String {
            guard let id, let data = try? JSONEncoder().encode(id) else { return "null" }
            return String(decoding: data, as: UTF8.self)
        }
    }

    /// What the server does in response to a request (or when the test pushes it).
    enum Action: Sendable {
        /// Reply to the current request with `{"return": value}`.
        case reply(JSONValue = [:])
        /// Reply to the current request with `{"error": {"class": ..., "desc": ...}}`.
        case error(class: String, desc: String)
        /// Reply to an earlier request, for answering out of order.
        case replyTo(id: JSONValue?, JSONValue)
        /// Send an event.
        case event(String, data: JSONValue? = nil)
        /// Write each string with a separate `send`, pausing briefly in between, so that lines
        /// can be split (or joined) anywhere.
        case raw([String])
        case delay(Duration)
        /// Hang up on the client.
        case close
    }

    typealias Script = @Sendable (Request) -> [Action]

    static let defaultGreeting: JSONValue = [
        "QMP": [
            "version": ["qemu": ["major": 10, "minor": 0, "micro": 2], "package": "stub-1.0"],
            "capabilities": ["oob"],
        ]
    ]

    let socketPath: String
    private let directory: String
    private let listener: Int32
    private let greeting: JSONValue?
    private let script: Script
    private let shared = Mutex(Shared())

    private struct Shared {
        var requests: [Request] = []
        /// The connected client, if any. Written to under this lock, so that lines written by the
        /// server thread and by `push` never interleave.
        var connection: Int32?
        var stopped = false
    }

    /// Starts listening at once.
    /// - Parameters:
    ///   - greeting: Sent to each client on connect; nil sends none.
    ///   - script: Decides the response to each request other than `qmp_capabilities`. The
    ///     default replies `{}` to everything.
    init(greeting: JSONValue? = StubQMPServer.defaultGreeting, script: @escaping Script = { _ in [.reply()] }) throws {
        // mkdtemp under /tmp: a socket path must fit in 108 bytes, which $TMPDIR may not allow.
        var template = Array("/tmp/qmpstub.XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else {
            throw StubError("mkdtemp: \(String(cString: strerror(errno)))")
        }
        directory = String(cString: created)
        socketPath = directory + "/qmp.sock"
        self.greeting = greeting
        self.script = script

        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw StubError("socket: \(String(cString: strerror(errno)))") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
            raw[pathBytes.count] = 0
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard bound == 0, listen(fd, 8) == 0 else {
            let message = String(cString: strerror(errno))
            close(fd)
            rmdir(directory)
            throw StubError("bind/listen \(socketPath): \(message)")
        }
        listener = fd

        let thread = Thread { [self] in serve() }
        thread.name = "StubQMPServer"
        thread.start()
    }

    /// Every request received so far, `qmp_capabilities` included, in arrival order.
    var requests: [Request] {
        shared.withLock { $0.requests }
    }

    /// Performs `actions` now, outside any request (e.g. an event nobody asked for yet).
    func push(_ actions: [Action]) {
        perform(actions, for: nil)
    }

    /// Waits until no client is connected (the client hung up).
    func waitUntilDisconnected(timeout: Duration = .seconds(10)) async throws {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while shared.withLock({ $0.connection != nil }) {
            guard ContinuousClock.now < deadline else {
                throw StubError("the client never disconnected")
            }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    /// Waits until `count` requests for `command` have arrived (and their answers were decided).
    func waitForRequest(_ command: String, count: Int = 1, timeout: Duration = .seconds(10)) async throws {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while requests.filter({ $0.command == command }).count < count {
            guard ContinuousClock.now < deadline else {
                throw StubError("the stub never received \(count) '\(command)' request(s)")
            }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    /// Hangs up, stops listening and removes the socket and its directory.
    func stop() {
        let connection = shared.withLock { shared in
            shared.stopped = true
            return shared.connection
        }
        // shutdown wakes the server thread's blocking accept/read; that thread closes the fds.
        if let connection {
            shutdown(connection, Int32(SHUT_RDWR))
        }
        shutdown(listener, Int32(SHUT_RDWR))
        unlink(socketPath)
        rmdir(directory)
    }

    // MARK: Server thread

    private func serve() {
        while true {
            let connection = accept(listener, nil, nil)
            if connection < 0 {
                if errno == EINTR { continue }
                break
            }
            let accepted = shared.withLock { shared in
                guard !shared.stopped else { return false }
                shared.connection = connection
                return true
            }
            guard accepted else {
                close(connection)
                break
            }
            if let greeting {
                write(greeting)
            }
            handleRequests(on: connection)
            shared.withLock { shared in
                shared.connection = nil
                close(connection)
            }
        }
        close(listener)
    }

    private func handleRequests(on connection: Int32) {
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(connection, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { return }
            pending.append(contentsOf: chunk[..<count])
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Data(pending[..<newline])
                pending.removeFirst(newline + 1)
                handle(line)
            }
        }
    }

    private func handle(_ line: Data) {
        guard let message = try? JSONDecoder().decode(JSONValue.self, from: line),
            let command = message["execute"]?.stringValue
        else { return }
        let request = Request(command: command, arguments: message["arguments"], id: message["id"])
        // The script runs before the request is recorded, so a test that waits for a request and
        // then changes what the script answers cannot change the answer to that request; and it is
        // recorded before the reply is written, so a caller holding the reply sees it recorded.
        let actions: [Action] = command == "qmp_capabilities" ? [.reply()] : script(request)
        shared.withLock { $0.requests.append(request) }
        perform(actions, for: request)
    }

    // MARK: Writing

    private func perform(_ actions: [Action], for request: Request?) {
        for action in actions {
            switch action {
            case .reply(let value):
                write(["return": value], id: request?.id)
            case .error(let errorClass, let desc):
                write(["error": ["class": .string(errorClass), "desc": .string(desc)]], id: request?.id)
            case .replyTo(let id, let value):
                write(["return": value], id: id)
            case .event(let name, let data):
                var now = timeval()
                gettimeofday(&now, nil)
                var event: [String: JSONValue] = [
                    "event": .string(name),
                    "timestamp": ["seconds": .number(Double(now.tv_sec)), "microseconds": .number(Double(now.tv_usec))],
                ]
                event["data"] = data
                write(.object(event))
            case .raw(let pieces):
                for (index, piece) in pieces.enumerated() {
                    if index > 0 { Thread.sleep(forTimeInterval: 0.005) }
                    send(Array(piece.utf8))
                }
            case .delay(let duration):
                let (seconds, attoseconds) = duration.components
                Thread.sleep(forTimeInterval: Double(seconds) + Double(attoseconds) / 1e18)
            case .close:
                shared.withLock { shared in
                    if let connection = shared.connection {
                        shutdown(connection, Int32(SHUT_RDWR))
                    }
                }
            }
        }
    }

    private func write(_ message: JSONValue, id: JSONValue?) {
        guard var members = message.objectValue else { return }
        members["id"] = id
        write(.object(members))
    }

    /// Writes one message as QEMU does: compact JSON ended by "\r\n".
    private func write(_ message: JSONValue) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(message) else { return }
        send(Array(data) + Array("\r\n".utf8))
    }

    private func send(_ bytes: [UInt8]) {
        shared.withLock { shared in
            guard let connection = shared.connection else { return }
            bytes.withUnsafeBytes { raw in
                guard let base = raw.baseAddress else { return }
                var offset = 0
                while offset < raw.count {
                    let written = Glibc.send(connection, base + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                    if written < 0 {
                        if errno == EINTR { continue }
                        return  // the client went away; the test will notice
                    }
                    offset += written
                }
            }
        }
    }
}

struct StubError: Error, CustomStringConvertible {
    let description: String

    init(_ description: String) {
        self.description = description
    }
}
