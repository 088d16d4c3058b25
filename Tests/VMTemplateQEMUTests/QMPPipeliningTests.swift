#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation
import Testing
import VMTemplateOS
import VMTemplateQEMU

@Suite("QMP pipelining and the pre-bound QMP listener", .timeLimit(.minutes(1)))
struct QMPPipeliningTests {
    @Test("pipelined commands go out behind qmp_capabilities, in order, and connect waits for every reply")
    func pipelinedInOrder() async throws {
        let server = try StubQMPServer { request in
            // A slow reply to the last command: connect must not return before it.
            request.command == "migrate-incoming" ? [.delay(.milliseconds(100)), .reply()] : [.reply()]
        }
        defer { server.stop() }
        let client = try await QMPClient.connect(
            socketPath: server.socketPath, timeout: .seconds(10),
            pipelining: [.migrateSetCapabilities(["x-ignore-shared": true, "events": true]), .migrateIncoming(uri: "file:/t/state")])
        defer { client.close() }

        #expect(server.requests.map(\.command) == ["qmp_capabilities", "migrate-set-capabilities", "migrate-incoming"])
        #expect(server.requests[1].arguments == [
            "capabilities": [["capability": "events", "state": true], ["capability": "x-ignore-shared", "state": true]],
        ])
        #expect(server.requests[2].arguments == ["uri": "file:/t/state"])
        // Distinct ids, so each reply finds its waiter.
        #expect(Set(server.requests.compactMap { $0.id?.intValue }).count == 3)
        // The connection stays usable for ordinary calls.
        try await client.cont()
        #expect(server.requests.last?.command == "cont")
    }

    @Test("an error reply to a pipelined command fails connect with QEMU's words")
    func pipelinedError() async throws {
        let server = try StubQMPServer { request in
            request.command == "migrate-incoming"
                ? [.error(class: "GenericError", desc: "'-incoming' was not specified on the command line")]
                : [.reply()]
        }
        defer { server.stop() }
        let error = try await #require(throws: QMPError.self) {
            try await QMPClient.connect(socketPath: server.socketPath, timeout: .seconds(10), pipelining: [.migrateIncoming(uri: "file:/t/state")])
        }
        #expect(error.command == "migrate-incoming")
        #expect(error.desc.contains("'-incoming' was not specified"))
    }

    @Test("waitForMigration(startedHere:) trusts the completed event and asks nothing more")
    func startedHereCompleted() async throws {
        let server = try StubQMPServer { request in
            request.command == "migrate-incoming"
                ? [.reply(), .event("MIGRATION", data: ["status": "active"]), .event("MIGRATION", data: ["status": "completed"])]
                : [.reply(["status": "active"])]
        }
        defer { server.stop() }
        let client = try await QMPClient.connect(socketPath: server.socketPath, timeout: .seconds(10), pipelining: [.migrateIncoming(uri: "file:/t/state")])
        defer { client.close() }
        let info = try await client.waitForMigration(timeout: .seconds(10), startedHere: true)
        #expect(info.status == "completed")
        #expect(!server.requests.contains { $0.command == "query-migrate" }, "the event is QEMU's word; no round trip")
    }

    @Test("waitForMigration(startedHere:) still fetches error-desc when the migration fails")
    func startedHereFailed() async throws {
        let server = try StubQMPServer { request in
            switch request.command {
            case "migrate-incoming": [.reply(), .event("MIGRATION", data: ["status": "failed"])]
            case "query-migrate": [.reply(["status": "failed", "error-desc": "load of migration failed: Invalid argument"])]
            default: [.reply()]
            }
        }
        defer { server.stop() }
        let client = try await QMPClient.connect(socketPath: server.socketPath, timeout: .seconds(10), pipelining: [.migrateIncoming(uri: "file:/t/state")])
        defer { client.close() }
        let error = try await #require(throws: VMTemplateError.self) {
            try await client.waitForMigration(timeout: .seconds(10), startedHere: true)
        }
        #expect(error.code == .qemuFailed)
        #expect(error.message.contains("load of migration failed: Invalid argument"))
    }

    @Test("a pre-bound listener takes connections before anybody accepts, and replaces a stale socket file")
    func listener() throws {
        let directory = try #require(mkdtemp(strdup("/tmp/qmplisten.XXXXXX")).map { String(cString: $0) })
        defer { try? FileSystem.removeTree(path: directory) }
        let path = "\(directory)/qmp.sock"

        // A stale socket file, as a crashed QEMU leaves behind: nothing listens on it.
        do { _ = try QMPListener(path: path) }
        let listener = try QMPListener(path: path)
        #expect(listener.descriptor >= 0)

        // connect() succeeds at once: the connection waits in the backlog for QEMU's accept.
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8)
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let client = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(client) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(connected == 0)

        // Anything but a socket at the path is not ours to remove.
        let regular = "\(directory)/file"
        #expect(FileManager.default.createFile(atPath: regular, contents: Data("keep".utf8)))
        #expect(throws: VMTemplateError.self) { try QMPListener(path: regular) }
        #expect(FileManager.default.contents(atPath: regular) == Data("keep".utf8))
        #expect(throws: VMTemplateError.self) { try QMPListener(path: "/" + String(repeating: "d", count: 120)) }
    }
}
