import Foundation
import Testing

@testable import VMTemplateAPI
@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// `GET /v1/events` and `vmtemplate events` on a real server and real guests: a clone's life as
/// events (created, running, paused, resumed, exited by itself with its status, removed after the
/// retention), a reconnect that misses nothing, and devices reported ready that the guest then
/// uses at once.
extension RealGuests {
    @Suite("events and device readiness", .serialized)
    struct EventsIntegrationTests {
        /// A follower of `GET /v1/events?follow=true`: the raw HTTP/1.1 stream, read by a thread;
        /// each JSON line of the chunked body is an event.
        final class EventStream: @unchecked Sendable {
            // @unchecked: `events` and `closed` are only touched under `lock`; `fd` is set once.
            private let fd: Int32
            private let lock = NSLock()
            private var lines: [String] = []
            private var closed = false

            init(socket: String, since: UInt64?) throws {
                guard case .success(let fd)? = UnixSocketAddress.connectStream(path: socket, storeRoot: nil, until: .now + .seconds(5)) else {
                    throw VMTemplateError(.ioError, "cannot connect to \(socket)")
                }
                self.fd = fd
                let query = since.map { "&since=\($0)" } ?? ""
                let request = Array("GET /v1/events?follow=true\(query) HTTP/1.1\r\nHost: vmtemplate\r\n\r\n".utf8)
                _ = request.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                let thread = Thread { [self] in readAll() }
                thread.start()
            }

            private func readAll() {
                var pending: [UInt8] = []
                var buffer = [UInt8](repeating: 0, count: 65536)
                while true {
                    let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    if count <= 0 { break }
                    pending += buffer[0..<count]
                    while let newline = pending.firstIndex(of: 0x0a) {
                        let line = String(decoding: pending[..<newline], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                        pending.removeSubrange(...newline)
                        // Chunk sizes and headers are not events; JSON objects are.
                        if line.hasPrefix("{") { lock.withLock { lines.append(line) } }
                    }
                }
                lock.withLock { closed = true }
            }

            var events: [StoreEvent] {
                lock.withLock { lines }.compactMap { try? JSONCoding.decoder().decode(StoreEvent.self, from: Data($0.utf8)) }
            }

            func close() { shutdown(fd, Int32(SHUT_RDWR)); Glibc.close(fd) }

            /// Waits until an event of `type` for `clone` has come.
            func waitFor(_ type: StoreEvent.Kind, clone: String?, timeout: Duration = .seconds(30)) async -> StoreEvent? {
                var found: StoreEvent?
                _ = await eventually(timeout: timeout) {
                    found = events.first { $0.type == type && (clone == nil || $0.clone == clone) }
                    return found != nil
                }
                return found
            }
        }

        @Test("a clone's life as events, followed live: created, running, paused, resumed, exited by itself with its status, removed after the retention; a reconnect misses nothing; the CLI prints the same; a position no longer kept is 410")
        func lifeAsEvents() async throws {
            let store = try TemporaryStore.withTemplates("events")
            defer { store.remove() }
            let server = try CLI.start(["serve", "--exited-retention", "2", "--log-format", "json"] + store.arguments)
            var stopped = false
            defer { if !stopped { server.process.terminate(); server.process.waitUntilExit() }; _ = try? CLI.run(["rm", "--all"] + store.arguments) }
            let socket = "\(store.root)/serve.sock"
            let client = UnixHTTPClient(socketPath: socket)
            #expect(await eventually(timeout: .seconds(20)) { (try? client.request("GET", "/v1/health"))?.status == 200 })

            let stream = try EventStream(socket: socket, since: 0)
            defer { stream.close() }
            #expect(await stream.waitFor(.templateAdded, clone: nil) != nil, "the backlog since 0 holds the template's creation")

            let made = try client.request("POST", "/v1/clones", body: Data(#"{"template": "busybox", "name": "ev-1"}"#.utf8))
            try #require(made.status == 201, "\(String(decoding: made.body, as: UTF8.self))")
            let clone = try JSONCoding.decoder().decode(CloneView.self, from: made.body)
            #expect(await stream.waitFor(.cloneRunning, clone: clone.id)?.name == "ev-1")
            #expect(try client.request("POST", "/v1/clones/ev-1/pause").status == 200)
            let paused = await stream.waitFor(.clonePaused, clone: clone.id)
            #expect(paused?.reason == "user")

            // The follower goes away; what happens meanwhile is read on reconnecting from the last
            // event it had, and nothing is missed or repeated.
            stream.close()
            let lastRead = try #require(stream.events.last).seq
            #expect(try client.request("POST", "/v1/clones/ev-1/resume").status == 200)
            // The guest powers itself off: QEMU exits with status 0, which serve (its parent) reads.
            #expect(try ControlChannel(path: clone.controlSocket).request("poweroff", timeout: .seconds(30)) == "powering off")
            let again = try EventStream(socket: socket, since: lastRead)
            defer { again.close() }
            let exited = await again.waitFor(.cloneExited, clone: clone.id)
            #expect(exited?.exitStatus == 0, "\(String(describing: exited))")
            let shown = try JSONCoding.decoder().decode(CloneView.self, from: try client.request("GET", "/v1/clones/\(clone.id)").body)
            #expect(shown.state == .exited && shown.exit?.exitStatus == 0, "the clone object says how it ended: \(String(describing: shown.exit))")
            let removed = await again.waitFor(.cloneRemoved, clone: clone.id)
            #expect(removed?.reason == "retention", "removed by the server after --exited-retention")
            #expect(try client.request("GET", "/v1/clones/\(clone.id)").status == 404)
            let resumedAfter = again.events
            #expect(resumedAfter.first?.seq == lastRead + 1 && zip(resumedAfter, resumedAfter.dropFirst()).allSatisfy { $1.seq == $0.seq + 1 }, "contiguous from the last event read: \(resumedAfter.map(\.seq))")
            #expect(resumedAfter.map(\.type).starts(with: [.cloneResumed, .cloneExited]), "\(resumedAfter.map(\.type))")

            // The same journal through the CLI and without follow.
            let cli = try CLI.run(["events", "--json", "--since", "0"] + store.arguments)
            #expect(cli.status == 0)
            let printed = cli.stdout.split(separator: "\n").compactMap { try? JSONCoding.decoder().decode(StoreEvent.self, from: Data($0.utf8)) }
            let listed = try client.request("GET", "/v1/events?since=0")
            #expect(listed.status == 200)
            let answered = String(decoding: listed.body, as: UTF8.self).split(separator: "\n").compactMap { try? JSONCoding.decoder().decode(StoreEvent.self, from: Data($0.utf8)) }
            #expect(printed.map(\.seq) == answered.map(\.seq) && printed.count >= 7, "\(printed.map(\.seq)) vs \(answered.map(\.seq))")
            #expect(try client.request("GET", "/v1/events?follow=maybe").status == 400)
            #expect(try client.request("GET", "/v1/events?since=-1").status == 400)

            // Events rotated away: a reader that asks for them is told to list again (410).
            let journal = try TemplateStore(root: store.root).events
            let kept = try String(contentsOfFile: journal.currentPath, encoding: .utf8).split(separator: "\n").dropFirst(3).joined(separator: "\n") + "\n"
            try FileSystem.writeFileAtomically(path: journal.currentPath, data: Array(kept.utf8), mode: 0o600, durable: false)
            let gone = try client.request("GET", "/v1/events?since=1")
            #expect(gone.status == 410, "\(String(decoding: gone.body, as: UTF8.self))")
            #expect(String(decoding: gone.body, as: UTF8.self).contains("no longer kept"))
            let cliGone = try CLI.run(["events", "--since", "1"] + store.arguments)
            #expect(cliGone.status == 66 && cliGone.stderr.contains("no longer kept"), "\(cliGone.stderr)")

            // --log-format json: every line of the server's log is a JSON object, the exit among them.
            server.process.terminate()
            server.process.waitUntilExit()
            stopped = true
            let logged = server.result().stderr.split(separator: "\n").map { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            #expect(!logged.isEmpty && logged.allSatisfy { $0?["time"] != nil && $0?["level"] != nil && $0?["message"] != nil }, "\(logged.prefix(3))")
            #expect(logged.contains { ($0?["message"] as? String)?.contains("exited: status 0") == true })
            #expect(logged.contains { $0?["status"] as? String == "410" && $0?["request_id"] != nil })
        }

        @Test("devices ready: clone --wait-devices returns once the guest sees its NIC, which it then uses at once; serve reports a CLI clone's NIC ready with an event; a hot-plugged disk too")
        func devicesReady() async throws {
            let store = try TemporaryStore.withTemplates("ready")
            defer { store.remove() }

            // Blocking: the NIC is there when clone returns; the guest configures and uses it with
            // no loop of its own.
            let port = try freeLocalPort()
            let waited = try CLI.run(["clone", "busybox", "--name", "wait-1", "--json", "--wait-devices", "--nic", "user,hostfwd=tcp:127.0.0.1:\(port)-:8080"] + store.arguments)
            try #require(waited.status == 0, "\(waited.stderr)")
            let view = try JSONCoding.decoder().decode(CloneView.self, from: Data(waited.stdout.utf8))
            #expect(view.devicesReady == true)
            let channel = ControlChannel(path: view.controlSocket)
            #expect(try channel.request("ip eth0 10.0.2.15/24", timeout: .seconds(60)) == "ok", "the NIC reported ready is configured at once")
            #expect(try channel.request("serve 8080") == "serving 8080")
            var answer = ""
            _ = await eventually(timeout: .seconds(20)) {
                answer = (try? readFromLocalPort(port)) ?? ""
                return !answer.isEmpty
            }
            #expect(answer.trimmingCharacters(in: .whitespacesAndNewlines) == "wait-1", "the guest answered through the NIC")

            // Not blocking: the record says false, and the server sees the devices and says so.
            let fresh = try CLI.run(["clone", "busybox", "--name", "later-1", "--json", "--nic", "user"] + store.arguments)
            try #require(fresh.status == 0, "\(fresh.stderr)")
            let later = try JSONCoding.decoder().decode(CloneView.self, from: Data(fresh.stdout.utf8))
            #expect(later.devicesReady == false)
            let server = try CLI.start(["serve"] + store.arguments)
            defer { server.process.terminate(); server.process.waitUntilExit(); _ = try? CLI.run(["rm", "--all"] + store.arguments) }
            let client = UnixHTTPClient(socketPath: "\(store.root)/serve.sock")
            #expect(await eventually(timeout: .seconds(30)) {
                guard let reply = try? client.request("GET", "/v1/clones/later-1") else { return false }
                return (try? JSONCoding.decoder().decode(CloneView.self, from: reply.body))?.devicesReady == true
            }, "serve saw the CLI clone's NIC")
            let images = try TestImages()
            defer { images.remove() }
            let added = try CLI.run(["device", "add", "later-1", "--disk", "path=\(images.raw),readonly=on"] + store.arguments)
            #expect(added.status == 0, "\(added.stderr)")
            #expect(await eventually(timeout: .seconds(30)) {
                let events = (try? TemplateStore(root: store.root).events.read(after: 0).events) ?? []
                return events.contains { $0.type == .cloneDevicesReady && $0.name == "later-1" && $0.devices == ["nic0", "disk0"] }
            }, "the hot-plugged disk reported ready with the NIC")
            let types = try TemplateStore(root: store.root).events.read(after: 0).events.filter { $0.name == "later-1" }.map(\.type)
            #expect(types == [.cloneCreated, .cloneRunning, .cloneDevicesReady, .cloneDeviceAdded, .cloneDevicesReady], "\(types)")

            // Through the API: wait_devices answers once the guest sees the NIC.
            let made = try client.request("POST", "/v1/clones", body: Data(#"{"template": "busybox", "name": "api-wait", "nics": [{"backend": "user"}], "wait_devices": true}"#.utf8))
            #expect(made.status == 201, "\(String(decoding: made.body, as: UTF8.self))")
            #expect(try JSONCoding.decoder().decode(CloneView.self, from: made.body).devicesReady == true)
        }

        @Test("shell completion offers the store's template names and clone names (not pool members), read from the --store on the command line")
        func nameCompletion() throws {
            let store = try TemporaryStore.withTemplates("complete")
            defer { store.remove() }
            try #require(try CLI.run(["clone", "busybox", "--name", "web-7"] + store.arguments).status == 0)
            defer { _ = try? CLI.run(["rm", "--all"] + store.arguments) }
            // What the generated scripts run: ---completion SUBCOMMAND -- ARGUMENT INDEX CURSOR WORDS...
            func offered(_ command: String, _ argument: String) throws -> [String] {
                let words = ["vmtemplate", command] + store.arguments + [""]
                return try CLI.run(["---completion", command, "--", argument, String(words.count - 1), "0"] + words).stdout.split(separator: "\n").map(String.init)
            }
            #expect(try offered("clone", "positional@0") == ["busybox"])
            #expect(try offered("rm", "positional@0") == ["web-7"])
            #expect(try offered("inspect", "positional@0") == ["busybox", "web-7"])
            #expect(try offered("verify", "positional@0") == ["busybox"])
        }
    }
}
