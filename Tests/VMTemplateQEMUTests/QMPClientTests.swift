import Foundation
import Synchronization
import Testing
import VMTemplateOS
import VMTemplateQEMU

@Suite("QMPClient against a stub QMP server", .timeLimit(.minutes(1)))
struct QMPClientTests {
    private func connect(to server: StubQMPServer) async throws -> QMPClient {
        try await QMPClient.connect(socketPath: server.socketPath, timeout: .seconds(10))
    }

    @Test("connecting reads the greeting, parses the version and negotiates capabilities")
    func greetingAndCapabilities() async throws {
        let server = try StubQMPServer()
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        #expect(client.greeting.qemuVersion == QEMUVersion(10, 0, 2))
        #expect(client.greeting.package == "stub-1.0")
        #expect(client.greeting.capabilities == ["oob"])
        let first = try #require(server.requests.first)
        #expect(first.command == "qmp_capabilities")
        #expect(first.arguments == nil)
        #expect(first.id?.intValue != nil)
    }

    @Test("typed commands send the arguments QMP expects and decode their replies")
    func typedCommandArguments() async throws {
        let server = try StubQMPServer { request in
            switch request.command {
            case "query-status": [.reply(["status": "paused", "running": false, "singlestep": false])]
            case "query-vm-generation-id": [.reply(["guid": "324e6eaf-d2d1-4bf6-bf41-b9bb6c61d55e"])]
            case "query-migrate": [.reply(["status": "failed", "error-desc": "disk full"])]
            default: [.reply()]
            }
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        try await client.migrateSetCapabilities(["x-ignore-shared": true, "events": true, "postcopy-ram": false])
        try await client.migrate(uri: "file:/var/lib/vmtemplate/state")
        try await client.migrateIncoming(uri: "unix:/run/in.sock")
        try await client.stop()
        try await client.cont()
        let status = try await client.queryStatus()
        let guid = try await client.queryVMGenerationID()
        let migration = try await client.queryMigrate()

        let requests = server.requests.dropFirst()  // qmp_capabilities
        #expect(requests.map(\.command) == [
            "migrate-set-capabilities", "migrate", "migrate-incoming", "stop", "cont",
            "query-status", "query-vm-generation-id", "query-migrate",
        ])
        let arguments = requests.map(\.arguments)
        #expect(arguments[0] == [
            "capabilities": [
                ["capability": "events", "state": true],
                ["capability": "postcopy-ram", "state": false],
                ["capability": "x-ignore-shared", "state": true],
            ]
        ])
        #expect(arguments[1] == ["uri": "file:/var/lib/vmtemplate/state"])
        #expect(arguments[2] == ["uri": "unix:/run/in.sock"])
        #expect(arguments[3...].allSatisfy { $0 == nil })
        // Every request carries its own id.
        let ids = server.requests.compactMap { $0.id?.intValue }
        #expect(ids.count == server.requests.count)
        #expect(Set(ids).count == ids.count)

        #expect(status == QMPStatus(status: "paused", running: false))
        #expect(guid == "324e6eaf-d2d1-4bf6-bf41-b9bb6c61d55e")
        #expect(migration == QMPMigrationInfo(status: "failed", errorDescription: "disk full"))
    }

    @Test("an error reply surfaces as a QMPError with class and description")
    func errorReply() async throws {
        let server = try StubQMPServer { _ in
            [.error(class: "GenericError", desc: "There's a migration process in progress")]
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        let error = try await #require(throws: QMPError.self) {
            try await client.migrate(uri: "file:/tmp/x")
        }
        #expect(error.command == "migrate")
        #expect(error.errorClass == "GenericError")
        #expect(error.desc == "There's a migration process in progress")
        #expect(
            error.description
                == "QMP command 'migrate' failed: GenericError: There's a migration process in progress")
    }

    @Test("an event sent before a command's reply is not lost")
    func eventBeforeReply() async throws {
        let server = try StubQMPServer { request in
            request.command == "stop" ? [.event("STOP"), .reply()] : [.reply()]
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        try await client.stop()
        let event = try await client.waitForEvent("STOP", timeout: .seconds(10))
        #expect(event.name == "STOP")
        #expect(event.data == nil)
        #expect(event.timestamp.seconds > 0)
        #expect(client.receivedEvents.map(\.name) == ["STOP"])
    }

    @Test("buffered events are returned once each, in order, honouring the predicate")
    func eventsAreConsumedOnce() async throws {
        let server = try StubQMPServer()
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        // Nobody is waiting yet; the client must buffer these.
        server.push([
            .event("MIGRATION", data: ["status": "setup"]),
            .event("RESUME"),
            .event("MIGRATION", data: ["status": "active"]),
            .event("MIGRATION", data: ["status": "completed"]),
        ])
        let completed = try await client.waitForEvent("MIGRATION", timeout: .seconds(10)) {
            $0.data?["status"]?.stringValue == "completed"
        }
        let first = try await client.waitForEvent("MIGRATION", timeout: .seconds(10))
        let second = try await client.waitForEvent("MIGRATION", timeout: .seconds(10))
        #expect(completed.data?["status"] == "completed")
        #expect(first.data?["status"] == "setup")
        #expect(second.data?["status"] == "active")

        // All consumed now: a further wait times out...
        let error = try await #require(throws: VMTemplateError.self) {
            try await client.waitForEvent("MIGRATION", timeout: .milliseconds(50))
        }
        #expect(error.code == .timeout)
        #expect(error.message.contains("MIGRATION"))
        // ...but the history still has everything, and a future event still arrives.
        #expect(client.receivedEvents.map(\.name) == ["MIGRATION", "RESUME", "MIGRATION", "MIGRATION"])
        async let later = client.waitForEvent("SHUTDOWN", timeout: .seconds(10))
        server.push([.event("SHUTDOWN", data: ["guest": false, "reason": "host-qmp-quit"])])
        #expect(try await later.data?["reason"]?.stringValue == "host-qmp-quit")
    }

    @Test("waitForMigration completes when the MIGRATION event arrives")
    func waitForMigrationCompletes() async throws {
        let migrationStatus = Mutex("active")
        let server = try StubQMPServer { request in
            switch request.command {
            case "query-migrate": [.reply(["status": .string(migrationStatus.withLock { $0 })])]
            default: [.reply()]
            }
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        try await client.migrateSetCapabilities(["events": true])
        try await client.migrate(uri: "file:/tmp/state")
        async let result = client.waitForMigration(timeout: .seconds(10))
        // Finish the migration only once the waiter has looked and seen it still active.
        try await server.waitForRequest("query-migrate")
        migrationStatus.withLock { $0 = "completed" }
        server.push([
            .event("MIGRATION", data: ["status": "device"]),
            .event("MIGRATION", data: ["status": "completed"]),
        ])
        let info = try await result
        #expect(info.status == "completed")
        #expect(server.requests.filter { $0.command == "query-migrate" }.count == 2)
    }

    @Test("waitForMigration returns when the migration finished before the call")
    func waitForMigrationAlreadyFinished() async throws {
        let server = try StubQMPServer { request in
            switch request.command {
            case "migrate":
                [.reply(), .event("MIGRATION", data: ["status": "active"]),
                 .event("MIGRATION", data: ["status": "completed"])]
            case "query-migrate": [.reply(["status": "completed"])]
            default: [.reply()]
            }
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        try await client.migrate(uri: "file:/tmp/state")
        let info = try await client.waitForMigration(timeout: .seconds(10))
        #expect(info.status == "completed")
    }

    @Test("waitForMigration fails with QEMU's error-desc when the migration fails")
    func waitForMigrationFails() async throws {
        let migrationStatus = Mutex<JSONValue>(["status": "active"])
        let server = try StubQMPServer { request in
            request.command == "query-migrate" ? [.reply(migrationStatus.withLock { $0 })] : [.reply()]
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        try await client.migrate(uri: "file:/full-disk/state")
        let result = Task { try await client.waitForMigration(timeout: .seconds(10)) }
        try await server.waitForRequest("query-migrate")
        migrationStatus.withLock {
            $0 = ["status": "failed", "error-desc": "Unable to write to file: No space left on device"]
        }
        server.push([.event("MIGRATION", data: ["status": "failed"])])

        let error = try await #require(throws: VMTemplateError.self) { try await result.value }
        #expect(error.code == .qemuFailed)
        #expect(error.message.contains("Unable to write to file: No space left on device"))
    }

    @Test("concurrent commands from several tasks each get their own reply, even out of order")
    func concurrentCommandsOutOfOrder() async throws {
        struct Echo: Codable, Sendable, Equatable {
            let n: Int
        }
        let taskCount = 8
        let held = Mutex<[StubQMPServer.Request]>([])
        let server = try StubQMPServer { request in
            // Hold every request until all have arrived, then answer them newest first.
            let batch: [StubQMPServer.Request]? = held.withLock { held in
                held.append(request)
                return held.count == taskCount ? held : nil
            }
            guard let batch else { return [] }
            return batch.reversed().map { .replyTo(id: $0.id, ["n": $0.arguments?["n"] ?? nil]) }
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        let results = try await withThrowingTaskGroup(of: (Int, Echo).self) { group in
            for n in 0..<taskCount {
                group.addTask {
                    (n, try await client.execute("echo", arguments: Echo(n: n), as: Echo.self))
                }
            }
            return try await group.reduce(into: [:]) { $0[$1.0] = $1.1 }
        }
        #expect(results.count == taskCount)
        for (n, echo) in results {
            #expect(echo == Echo(n: n))
        }
    }

    @Test("a command times out when the server never replies, and the client stays usable")
    func commandTimeout() async throws {
        let server = try StubQMPServer { request in
            request.command == "query-hotpluggable-cpus" ? [] : [.reply(["status": "running", "running": true])]
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        let error = try await #require(throws: VMTemplateError.self) {
            try await client.execute("query-hotpluggable-cpus", timeout: .milliseconds(100))
        }
        #expect(error.code == .timeout)
        #expect(error.message.contains("query-hotpluggable-cpus"))
        #expect(error.message.contains("100 ms"))
        #expect(error.message.contains(server.socketPath))

        #expect(try await client.queryStatus().running)
    }

    @Test("connect times out when nobody listens, naming the socket and the time")
    func connectTimeout() async throws {
        let path = "/tmp/qmp-nobody-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let error = try await #require(throws: VMTemplateError.self) {
            try await QMPClient.connect(socketPath: path, timeout: .milliseconds(200))
        }
        #expect(error.code == .timeout)
        #expect(error.message.contains(path))
        #expect(error.message.contains("200 ms"))
    }

    @Test("connect gives up with qemuFailed once the peer is no longer alive")
    func connectPeerDead() async throws {
        let path = "/tmp/qmp-dead-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let error = try await #require(throws: VMTemplateError.self) {
            try await QMPClient.connect(socketPath: path, timeout: .seconds(30), isPeerAlive: { false })
        }
        #expect(error.code == .qemuFailed)
        #expect(error.message.contains(path))
    }

    @Test("connect times out when the server accepts but never greets")
    func connectWithoutGreeting() async throws {
        let server = try StubQMPServer(greeting: nil)
        defer { server.stop() }
        let error = try await #require(throws: VMTemplateError.self) {
            try await QMPClient.connect(socketPath: server.socketPath, timeout: .milliseconds(200))
        }
        #expect(error.code == .timeout)
        #expect(error.message.contains(server.socketPath))
    }

    @Test("the peer hanging up fails a pending call at once, and later calls too")
    func peerClosesDuringCall() async throws {
        let server = try StubQMPServer { request in
            request.command == "stop" ? [.delay(.milliseconds(20)), .close] : [.reply()]
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        // A long timeout: the close, not the timer, must end the call.
        let error = try await #require(throws: VMTemplateError.self) {
            try await client.execute("stop", timeout: .seconds(60))
        }
        #expect(error.code == .qemuFailed)
        #expect(error.message.contains("closed"))
        #expect(error.message.contains("'stop'"))

        let later = try await #require(throws: VMTemplateError.self) { try await client.cont() }
        #expect(later.code == .qemuFailed)
        let event = try await #require(throws: VMTemplateError.self) {
            try await client.waitForEvent("STOP", timeout: .seconds(60))
        }
        #expect(event.code == .qemuFailed)
    }

    @Test("quit succeeds when QEMU closes the socket", arguments: [true, false])
    func quitWithClose(repliesFirst: Bool) async throws {
        let server = try StubQMPServer { request in
            guard request.command == "quit" else { return [.reply()] }
            return repliesFirst ? [.reply(), .close] : [.close]
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        try await client.quit()
        #expect(server.requests.last?.command == "quit")
    }

    @Test("lines split across writes, several per write, and non-JSON noise are all handled")
    func partialLines() async throws {
        let server = try StubQMPServer { request in
            guard request.command == "query-status" else { return [.reply()] }
            return [
                .raw([
                    "this is not JSON\r\n\r\n{\"event\": \"ST",
                    "OP\", \"timestamp\": {\"seconds\": 1700000000, \"microse",
                    "conds\": 5}}\r\n{\"return\": {\"status\": \"pa",
                    "used\", \"running\": false}, \"id\": \(request.idJSON)}\r",
                    "\n{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 1700000001, \"microseconds\": 0}}\n",
                ])
            ]
        }
        defer { server.stop() }
        let client = try await connect(to: server)
        defer { client.close() }

        let status = try await client.queryStatus()
        #expect(status == QMPStatus(status: "paused", running: false))
        let stop = try await client.waitForEvent("STOP", timeout: .seconds(10))
        #expect(stop.timestamp == QMPEvent.Timestamp(seconds: 1_700_000_000, microseconds: 5))
        _ = try await client.waitForEvent("RESUME", timeout: .seconds(10))
    }

    @Test("close() fails pending calls, refuses new ones, and may be called twice")
    func closeFailsPendingCalls() async throws {
        let server = try StubQMPServer { _ in [] }
        defer { server.stop() }
        let client = try await connect(to: server)

        let pending = Task { try await client.execute("stop", timeout: .seconds(60)) }
        try await server.waitForRequest("stop")
        client.close()
        client.close()
        let error = try await #require(throws: VMTemplateError.self) { try await pending.value }
        #expect(error.code == .ioError)
        let later = try await #require(throws: VMTemplateError.self) { try await client.cont() }
        #expect(later.code == .ioError)
    }

    @Test("dropping the last reference to the client closes the connection")
    func deinitCloses() async throws {
        let server = try StubQMPServer()
        defer { server.stop() }
        var client: QMPClient? = try await connect(to: server)
        try await client?.stop()
        client = nil
        // The reader thread must not keep the client alive: the server sees the hang-up.
        try await server.waitUntilDisconnected()
    }

    @Test("JSONValue decodes and re-encodes QMP data faithfully")
    func jsonValueRoundTrip() throws {
        let text = #"{"a":[1,2.5,true,null,"x"],"b":{"c":false}}"#
        let value = try JSONDecoder().decode(JSONValue.self, from: Data(text.utf8))
        #expect(value == ["a": [1, 2.5, true, nil, "x"], "b": ["c": false]])
        #expect(value["a"]?[1]?.numberValue == 2.5)
        #expect(value["a"]?[0]?.intValue == 1)
        #expect(value["a"]?[4]?.stringValue == "x")
        #expect(value["b"]?["c"]?.boolValue == false)
        #expect(value["missing"] == nil)
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let again = try JSONDecoder().decode(JSONValue.self, from: encoder.encode(value))
        #expect(again == value)
    }
}

// MARK: - Real QEMU

/// The path of `name` on `$PATH`, if it is there and executable.
private func executableOnPath(_ name: String) -> String? {
    let directories = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":")
    return directories.lazy
        .map { "\($0)/\(name)" }
        .first { FileManager.default.isExecutableFile(atPath: $0) }
}

private let qemuSystemX86 = executableOnPath("qemu-system-x86_64")

@Suite("QMPClient against a real QEMU", .timeLimit(.minutes(1)))
struct QMPClientQEMUTests {
    @Test(
        "a real QEMU reports a stopped VM over QMP and exits on quit",
        .enabled(if: qemuSystemX86 != nil, "qemu-system-x86_64 is not on PATH; skipping the real-QEMU smoke test")
    )
    func realQEMUSmokeTest() async throws {
        let qemu = try #require(qemuSystemX86)
        var template = Array("/tmp/qmpqemu.XXXXXX".utf8CString)
        let directory = String(cString: try #require(mkdtemp(&template)))
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socketPath = directory + "/qmp.sock"

        let process = Process()
        process.executableURL = URL(fileURLWithPath: qemu)
        process.arguments = [
            "-machine", "none", "-nodefaults", "-display", "none", "-S",
            "-qmp", "unix:\(socketPath),server=on,wait=off",
        ]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        let stderrPath = directory + "/stderr"
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: stderrPath))
        try process.run()
        defer {
            if process.isRunning { process.terminate() }
        }

        let client = try await QMPClient.connect(
            socketPath: socketPath, timeout: .seconds(20), isPeerAlive: { process.isRunning })
        defer { client.close() }
        #expect(client.greeting.qemuVersion.major >= 2)

        let status = try await client.queryStatus()
        #expect(["prelaunch", "paused"].contains(status.status))
        #expect(status.running == false)

        try await client.quit()
        let deadline = ContinuousClock.now.advanced(by: .seconds(20))
        while process.isRunning, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
        }
        let stderr = (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? ""
        #expect(!process.isRunning, "QEMU did not exit after quit. stderr: \(stderr)")
        if !process.isRunning {
            #expect(process.terminationStatus == 0, "stderr: \(stderr)")
        }
    }
}
