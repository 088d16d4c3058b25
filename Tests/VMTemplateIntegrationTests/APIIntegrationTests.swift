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

/// `vmtemplate serve` on real guests: every endpoint, every error status, a caller without
/// access, pools refilled by the server, and the OpenAPI document against the server.
extension RealGuests {
    @Suite("the API of vmtemplate serve", .serialized)
    struct APIIntegrationTests {
        static let openAPIPath = "\(Checkout.root)/docs/api.openapi.json"

        /// A store with the busybox template and a pool of 2, and its server.
        final class Server {
            let store: TemporaryStore
            let process: CLI.Running
            let client: UnixHTTPClient
            /// (method, route, status) of every answer seen, for the OpenAPI check.
            var seen: [(String, String, Int)] = []

            init() throws {
                store = try TemporaryStore("api")
                let created = try CLI.run(["create", "busybox", "--recipe", Checkout.busyboxRecipe] + store.arguments)
                guard created.status == 0 else { throw VMTemplateError(.internalError, "create failed", detail: created.stderr) }
                _ = try CLI.run(["pool", "set", "busybox", "--size", "2"] + store.arguments)
                // nogroup: nobody's group, so nobody may use the API as a member of it.
                process = try CLI.start(["serve", "--fill-pause", "0", "--socket-group", "nogroup", "--metrics-file", "\(store.root)/metrics.prom", "--metrics-interval", "1", "--per-clone-metrics"] + store.arguments)
                client = UnixHTTPClient(socketPath: "\(store.root)/serve.sock")
            }

            func request(_ method: String, _ path: String, route: String? = nil, _ body: String? = nil) throws -> UnixHTTPClient.Reply {
                let reply = try client.request(method, path, body: body.map { Data($0.utf8) })
                seen.append((method, route ?? path, reply.status))
                return reply
            }

            func json(_ reply: UnixHTTPClient.Reply) -> Any? { try? JSONSerialization.jsonObject(with: reply.body) }

            func stop() -> CommandResult {
                process.process.terminate()
                process.process.waitUntilExit()
                _ = try? CLI.run(["pool", "set", "busybox", "--size", "0"] + store.arguments)
                _ = try? CLI.run(["rm", "--all"] + store.arguments)
                let result = process.result()
                store.remove()
                return result
            }
        }

        /// The children of `pid` that are zombies (exited, never reaped).
        static func zombieChildren(of pid: Int32) -> [Int32] {
            let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
            return entries.compactMap(Int32.init).filter { child in
                guard let stat = try? String(contentsOfFile: "/proc/\(child)/stat", encoding: .utf8),
                      let close = stat.lastIndex(of: ")") else { return false }
                // After the command's closing parenthesis: state, then the parent's PID.
                let fields = stat[stat.index(after: close)...].split(separator: " ")
                return fields.count > 1 && fields[0] == "Z" && Int32(fields[1]) == pid
            }
        }

        @Test("a --group template is listed to and cloned for only the callers in its group, though others may use the socket", .enabled(if: Environment.isRoot, "needs root to make groups and switch to another user"))
        func groupTemplateThroughAPI() async throws {
            let suffix = UUID().uuidString.prefix(6).lowercased()
            let (templateGroup, socketGroup) = ("vmt-t\(suffix)", "vmt-s\(suffix)")
            for group in [templateGroup, socketGroup] { _ = try Shell.run("groupadd \(group)") }
            defer { for group in [templateGroup, socketGroup] { _ = try? Shell.run("groupdel \(group)") } }
            let store = try TemporaryStore("apigrp")
            defer { store.remove() }
            let created = try CLI.run(["create", "gtpl", "--recipe", Checkout.busyboxRecipe, "--group", templateGroup] + store.arguments)
            try #require(created.status == 0, "\(created.stderr)")
            let server = try CLI.start(["serve", "--socket-group", socketGroup] + store.arguments)
            defer {
                server.process.terminate()
                server.process.waitUntilExit()
                _ = try? CLI.run(["rm", "--all"] + store.arguments)
            }
            let client = UnixHTTPClient(socketPath: "\(store.root)/serve.sock")
            #expect(await eventually(timeout: .seconds(30)) { (try? client.request("GET", "/v1/templates"))?.status == 200 })
            func asNobody(groups: String?, _ arguments: [String]) throws -> ShortCommand.Output {
                let identity = ["--reuid=nobody", "--regid=\(socketGroup)"] + (groups.map { ["--groups=\($0)"] } ?? ["--clear-groups"])
                return try ShortCommand.run("/usr/bin/setpriv", identity + ["--", Checkout.binary, "api"] + arguments + ["--socket", "\(store.root)/serve.sock"] + store.arguments)
            }
            let outsider = try asNobody(groups: nil, ["GET", "/v1/templates"])
            #expect(outsider.status == 0 && !outsider.stdout.contains("gtpl"), "\(outsider.stdout) \(outsider.stderr)")
            let refused = try asNobody(groups: nil, ["POST", "/v1/clones", #"{"template": "gtpl"}"#])
            #expect(refused.status != 0 && refused.stdout.contains("permissionDenied") && refused.stdout.contains("may be read only by its group"), "\(refused.stdout) \(refused.stderr)")
            let member = try asNobody(groups: templateGroup, ["GET", "/v1/templates"])
            #expect(member.stdout.contains("gtpl"), "\(member.stdout) \(member.stderr)")
            let made = try asNobody(groups: templateGroup, ["POST", "/v1/clones", #"{"template": "gtpl"}"#])
            #expect(made.status == 0 && made.stdout.contains("\"template\" : \"gtpl\""), "\(made.stdout) \(made.stderr)")
            // Nor do its clones show it to the others: not listed, not found.
            let madeID = try #require((try JSONSerialization.jsonObject(with: Data(made.stdout.utf8)) as? [String: Any])?["id"] as? String)
            let others = try asNobody(groups: nil, ["GET", "/v1/clones"])
            #expect(others.status == 0 && !others.stdout.contains("gtpl"), "\(others.stdout)")
            let hidden = try asNobody(groups: nil, ["GET", "/v1/clones/\(madeID)"])
            #expect(hidden.status == 66 && hidden.stdout.contains("notFound"), "\(hidden.status) \(hidden.stdout)")
            #expect(try asNobody(groups: templateGroup, ["GET", "/v1/clones"]).stdout.contains("gtpl"), "the group's members see them")
            // The events likewise: a template's history is its readers' to see.
            let outsiderEvents = try asNobody(groups: nil, ["GET", "/v1/events?since=0"])
            #expect(outsiderEvents.status == 0 && !outsiderEvents.stdout.contains("gtpl") && !outsiderEvents.stdout.contains(madeID), "\(outsiderEvents.stdout)")
            #expect(try asNobody(groups: templateGroup, ["GET", "/v1/events?since=0"]).stdout.contains(madeID), "the group's members see them")

            // A connection outlives the process that made it: the caller's groups are those of that
            // process while it lives, never those of whoever gets its PID next. An outsider
            // connects, hands the connection to its child and exits; its PID goes to a member of
            // the template's group (ns_last_pid, as root); then the child asks.
            let script = """
                import os, socket, grp, pwd, sys, time
                nobody = pwd.getpwnam("nobody").pw_uid
                sgid = grp.getgrnam("\(socketGroup)").gr_gid
                tgid = grp.getgrnam("\(templateGroup)").gr_gid
                def become(groups):
                    os.setgroups(groups); os.setgid(sgid); os.setuid(nobody)
                go_r, go_w = os.pipe(); ready_r, ready_w = os.pipe(); out_r, out_w = os.pipe()
                outsider = os.fork()
                if outsider == 0:
                    become([])
                    s = socket.socket(socket.AF_UNIX); s.connect("\(store.root)/serve.sock")
                    if os.fork() == 0:
                        os.read(go_r, 1)
                        s.sendall(b"GET /v1/templates HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
                        data = b""
                        while True:
                            chunk = s.recv(65536)
                            if not chunk: break
                            data += chunk
                        os.write(out_w, data); os._exit(0)
                    os._exit(0)
                os.waitpid(outsider, 0)
                with open("/proc/sys/kernel/ns_last_pid", "w") as f: f.write(str(outsider - 1))
                member = os.fork()
                if member == 0:
                    os.close(out_w); become([tgid]); os.write(ready_w, b"x"); time.sleep(30); os._exit(0)
                os.read(ready_r, 1)
                os.write(go_w, b"x"); os.close(out_w)
                reply = b""
                while True:
                    chunk = os.read(out_r, 65536)
                    if not chunk: break
                    reply += chunk
                os.kill(member, 9)
                print("reused" if member == outsider else "not-reused")
                print(reply.decode(errors="replace"))
                """
            let reused = try ShortCommand.run("/usr/bin/python3", ["-c", script])
            #expect(reused.status == 0, "\(reused.stderr)")
            // The PID is handed on by the kernel's counter, which another process of this machine
            // may take first: then there is nothing to check this time.
            if reused.stdout.hasPrefix("reused") {
                #expect(reused.stdout.contains("200 OK") && !reused.stdout.contains("gtpl"), "the outsider's connection got the new owner's groups: \(reused.stdout)")
            } else {
                Issue.record("the outsider's PID was not reused (another process took it): run again")
            }
        }

        @Test("serve refuses a socket below a directory others may change; the client refuses a server run by another user", .enabled(if: Environment.isRoot, "needs root to switch to another user"))
        func socketPathTrust() async throws {
            let store = try TemporaryStore("sock")
            defer { store.remove() }
            let open = "/tmp/vmt-open-\(UUID().uuidString.prefix(8))"
            try FileManager.default.createDirectory(atPath: "\(open)/sub", withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: open) }
            chmod(open, 0o777)
            // Started, not run: a server that accepted the path would serve until stopped.
            let serving = try CLI.start(["serve", "--socket", "\(open)/sub/s.sock"] + store.arguments)
            let exited = await eventually(timeout: .seconds(20)) { !serving.process.isRunning }
            if !exited { serving.process.terminate(); serving.process.waitUntilExit() }
            let refused = serving.result()
            #expect(exited && refused.status == 77 && refused.stderr.contains("'\(open)', on the way to --socket, may be changed by everyone"), "\(refused.status) \(refused.stderr)")
            #expect(!FileManager.default.fileExists(atPath: "\(open)/sub/s.sock"))

            // Another user's server where root's client looks: nothing is sent to it.
            chown("\(open)/sub", 65534, 65534)
            let fake = Process()
            fake.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            fake.arguments = ["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", "/usr/bin/python3", "-c", """
                import socket, sys
                s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4)
                while True:
                    c, _ = s.accept()
                    try:
                        data = c.recv(4096)
                        c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}" if data else b"")
                    except OSError:
                        pass
                    c.close()
                """, "\(open)/sub/fake.sock"]
            fake.standardInput = FileHandle.nullDevice
            fake.standardOutput = FileHandle.nullDevice
            fake.standardError = FileHandle.nullDevice
            try fake.run()
            // SIGKILL: the test runner may ignore SIGTERM, and its children inherit that (this
            // stub outlived every run before).
            defer {
                kill(fake.processIdentifier, SIGKILL)
                fake.waitUntilExit()
            }
            #expect(await eventually(timeout: .seconds(10)) { FileManager.default.fileExists(atPath: "\(open)/sub/fake.sock") })
            let fooled = try CLI.run(["api", "GET", "/v1/pools", "--socket", "\(open)/sub/fake.sock"] + store.arguments)
            #expect(fooled.status == 77 && fooled.stderr.contains("served by uid 65534"), "\(fooled.status) \(fooled.stdout) \(fooled.stderr)")
            // A store of that user's does not vouch for a socket elsewhere: only its own
            // STORE/serve.sock is trusted to be served by the store's owner.
            let theirs = "\(open)/theirs"
            try FileManager.default.createDirectory(atPath: theirs, withIntermediateDirectories: true)
            chown(theirs, 65534, 65534)
            let vouched = try CLI.run(["api", "GET", "/v1/pools", "--socket", "\(open)/sub/fake.sock", "--store", theirs])
            #expect(vouched.status == 77 && vouched.stderr.contains("served by uid 65534"), "\(vouched.status) \(vouched.stdout) \(vouched.stderr)")
        }

        @Test("serve tells systemd it is ready once its API accepts; a second serve for one store is refused in one line, even on another socket")
        func oneServerPerStore() async throws {
            let store = try TemporaryStore("twoserve")
            defer { store.remove() }
            // No server yet: the client exits 69 (unavailable), not 66 (which a 404 answer gives).
            #expect(try CLI.run(["api", "GET", "/v1/pools"] + store.arguments).status == 69)
            // As systemd runs it (Type=notify): READY=1 arrives, and by then the API answers.
            let notify = "\(store.root)/notify.sock"
            let listener = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
            defer { close(listener) }
            let address = try #require(UnixSocketAddress(path: notify))
            #expect(address.withSockaddr { bind(listener, $0, $1) } == 0)
            let first = try CLI.start(["serve"] + store.arguments, environment: ["NOTIFY_SOCKET": notify])
            defer { first.process.terminate(); first.process.waitUntilExit() }
            var descriptor = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            #expect(poll(&descriptor, 1, 30_000) == 1, "READY=1 within 30 s")
            var buffer = [UInt8](repeating: 0, count: 512)
            let count = recv(listener, &buffer, buffer.count, 0)
            #expect(String(decoding: buffer[0..<max(0, count)], as: UTF8.self).hasPrefix("READY=1\n"))
            let client = UnixHTTPClient(socketPath: "\(store.root)/serve.sock")
            #expect(try client.request("GET", "/v1/health").status == 200, "the API answers once READY=1 is sent")
            let other = "/tmp/vmt-second-\(UUID().uuidString.prefix(8)).sock"
            defer { unlink(other) }
            let second = try CLI.start(["serve", "--socket", other] + store.arguments)
            let exited = await eventually(timeout: .seconds(20)) { !second.process.isRunning }
            if !exited { second.process.terminate(); second.process.waitUntilExit() }
            let refused = second.result()
            #expect(exited && refused.status == 75 && refused.stderr.contains("already runs for store"), "\(refused.status) \(refused.stderr)")
            #expect(!FileManager.default.fileExists(atPath: other), "the second server never served")
        }

        @Test("metrics: per-template sums always, per-clone series only when asked for (bounded cardinality), the version, every counter from 0")
        func metricsCardinality() throws {
            let me = try #require(ProcessIdentity.current(pid: getpid()))
            let records = (0..<3).map { index in
                CloneRecord(id: String(format: "%012x", index + 1), name: "c\(index)", template: "busybox", qemu: me, qemuExecutable: nil, creator: me, createdAt: Date(), state: .running, templateStore: nil, memoryFile: "/s/templates/busybox/memory", writableTemplate: false, vmgenid: nil, qemuArguments: [], restoreSeconds: nil, guestMemoryBytes: nil, cowLimitBytes: nil, overLimitAction: nil, lastEnforcement: nil)
            }
            let usage = CloneMemoryUsage(copyOnWriteBytes: 100, templateResidentBytes: 0, qemuPrivateBytes: 10, swapBytes: 0)
            let plain = try PrometheusText.parse(APIMetrics().render(records: records, pools: [], measure: { _ in usage }))
            #expect(plain.value("vmtemplate_cow_bytes", ["template": "busybox"]) == 300 && plain.value("vmtemplate_qemu_private_bytes", ["template": "busybox"]) == 30)
            #expect(!plain.samples.contains { $0.labels["clone"] != nil }, "no per-clone series by default")
            #expect(plain.value("vmtemplate_build_info", ["version": VMTemplateVersion.current]) == 1)
            #expect(plain.value("vmtemplate_errors_total", ["error": "notFound"]) == 0)
            let detailed = try PrometheusText.parse(APIMetrics(perClone: true).render(records: records, pools: [], measure: { _ in usage }))
            #expect(detailed.samples.filter { $0.name == "vmtemplate_clone_cow_bytes" }.count == 3)
        }

        @Test("gc does not hang on a server that stopped accepting (its backlog full): it leaves the socket")
        func gcAgainstFullBacklog() async throws {
            let store = try TemporaryStore("backlog")
            defer { store.remove() }
            _ = try CLI.run(["gc"] + store.arguments)
            let stuck = Process()
            stuck.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            stuck.arguments = ["-c", """
                import socket, sys, time
                s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(0)
                held = []
                for _ in range(4):
                    c = socket.socket(socket.AF_UNIX); c.setblocking(False)
                    try: c.connect(sys.argv[1])
                    except OSError: pass
                    held.append(c)
                print("full", flush=True); time.sleep(60)
                """, "\(store.root)/serve.sock"]
            let output = Pipe()
            stuck.standardOutput = output
            try stuck.run()
            defer { stuck.terminate() }
            _ = output.fileHandleForReading.availableData
            let started = ContinuousClock.now
            let collected = try CLI.start(["gc"] + store.arguments)
            let ended = await eventually(timeout: .seconds(20)) { !collected.process.isRunning }
            if !ended { collected.process.terminate(); collected.process.waitUntilExit() }
            #expect(ended && collected.result().status == 0, "gc hung for \(started.duration(to: .now)) on a full backlog")
            #expect(FileManager.default.fileExists(atPath: "\(store.root)/serve.sock"), "a live server's socket stays")
        }

        @Test("serve reaps every QEMU it starts: no zombie after 50 API creates and deletes, fresh and from its pool")
        func reapsChildren() async throws {
            let server = try Server()
            defer { _ = server.stop() }
            let serverPID = server.process.process.processIdentifier
            #expect(await eventually(timeout: .seconds(30)) { (try? server.client.request("GET", "/v1/pools"))?.status == 200 }, "the server answers")
            for index in 0..<50 {
                let body = index % 2 == 0 ? #"{"template": "busybox", "no_pool": true}"# : #"{"template": "busybox"}"#
                let made = try server.request("POST", "/v1/clones", body)
                try #require(made.status == 201, "create \(index): \(String(decoding: made.body, as: UTF8.self))")
                let clone = try JSONCoding.decoder().decode(CloneView.self, from: made.body)
                let removed = try server.request("DELETE", "/v1/clones/\(clone.id)", route: "/v1/clones/{id}")
                #expect(removed.status == 200)
            }
            // The pool's members are the server's children too: removed by the CLI, reaped by it.
            #expect(try CLI.run(["pool", "set", "busybox", "--size", "0"] + server.store.arguments).status == 0)
            var zombies: [Int32] = []
            let reaped = await eventually(timeout: .seconds(10)) {
                zombies = Self.zombieChildren(of: serverPID)
                return zombies.isEmpty
            }
            #expect(reaped, "zombies under serve (\(serverPID)): \(zombies)")
        }

        @Test("every endpoint and error status; pools refilled by the server; a caller without access refused; the OpenAPI document matches the server")
        func endpoints() async throws {
            let server = try Server()
            var stopped: CommandResult?
            defer { if stopped == nil { _ = server.stop() } }
            #expect(await eventually(timeout: .seconds(60)) {
                guard let reply = try? server.client.request("GET", "/v1/pools"), reply.status == 200 else { return false }
                return String(decoding: reply.body, as: UTF8.self).contains("\"ready\" : 2")
            }, "the server filled the pool")
            let socket = try FileStatus.read(path: "\(server.store.root)/serve.sock")
            #expect(socket.mode & 0o777 == 0o660)

            let templates = try server.request("GET", "/v1/templates")
            #expect(templates.status == 200 && String(decoding: templates.body, as: UTF8.self).contains("\"name\" : \"busybox\""))

            let made = try server.request("POST", "/v1/clones", #"{"template": "busybox", "name": "api-1"}"#)
            #expect(made.status == 201, "\(String(decoding: made.body, as: UTF8.self))")
            let clone = try JSONCoding.decoder().decode(CloneView.self, from: made.body)
            #expect(clone.fromPool && clone.name == "api-1")
            #expect(try ControlChannel(path: clone.controlSocket).request("ping", timeout: .seconds(30)) == "pong")
            #expect(try ControlChannel(path: clone.controlSocket).request("hostname") == "api-1")
            let fresh = try server.request("POST", "/v1/clones", #"{"template": "busybox", "no_pool": true, "nics": [{"backend": "user"}]}"#)
            #expect(fresh.status == 201)
            let freshClone = try JSONCoding.decoder().decode(CloneView.self, from: fresh.body)
            #expect(!freshClone.fromPool && freshClone.devices.map(\.id) == ["nic0"])

            let listed = try server.request("GET", "/v1/clones")
            #expect(listed.status == 200)
            #expect(try JSONCoding.decoder().decode([CloneView].self, from: listed.body).map(\.id).sorted() == [clone.id, freshClone.id].sorted(), "pool members are not listed as clones")
            let one = try server.request("GET", "/v1/clones/api-1", route: "/v1/clones/{id}")
            #expect(one.status == 200)
            #expect(try JSONCoding.decoder().decode(CloneView.self, from: one.body).state == .running)

            // The API takes what `clone` takes, checked by the same code (CloneOptions).
            let tuned = try server.request("POST", "/v1/clones", #"{"template": "busybox", "name": "api-tuned", "no_pool": true, "timeout": 20, "cow_limit": "64M", "over_limit": "kill", "vmgenid": false, "tcg_tb_size": 8}"#)
            #expect(tuned.status == 201, "\(String(decoding: tuned.body, as: UTF8.self))")
            let tunedClone = try JSONCoding.decoder().decode(CloneView.self, from: tuned.body)
            #expect(tunedClone.overLimitAction == .kill && tunedClone.cowLimitBytes == 64 << 20 && tunedClone.vmgenid == nil)
            let tunedRecord = try #require(try TemplateStore(root: server.store.root).findClone("api-tuned"))
            #expect(tunedRecord.qemuArguments.joined(separator: " ").contains("tb-size=8"), "\(tunedRecord.qemuArguments)")
            // A clone whose QEMU was killed is listed as exited, not as last recorded.
            let tunedPID = try #require(tunedClone.pid)
            kill(tunedPID, SIGKILL)
            #expect(await eventually(timeout: .seconds(10)) {
                guard let listed = try? server.request("GET", "/v1/clones"), let clones = try? JSONCoding.decoder().decode([CloneView].self, from: listed.body) else { return false }
                return clones.first { $0.id == tunedClone.id }?.state == .exited
            }, "GET /v1/clones shows the killed clone as exited")
            #expect(try server.request("DELETE", "/v1/clones/api-tuned", route: "/v1/clones/{id}").status == 200)
            // Two removals of one clone at once in one server: one removes it, the other is told
            // it is gone (before, both claimed it and both said they stopped it).
            let twice = try server.request("POST", "/v1/clones", #"{"template": "busybox", "name": "api-twice", "no_pool": true}"#)
            #expect(twice.status == 201)
            let client = server.client
            let statuses = await withTaskGroup(of: Int.self) { group in
                for _ in 0..<2 { group.addTask { (try? await onOwnThread { try client.request("DELETE", "/v1/clones/api-twice") })?.status ?? 0 } }
                return await group.reduce(into: []) { $0.append($1) }
            }
            #expect(statuses.sorted() == [200, 404], "\(statuses)")
            server.seen.append(("DELETE", "/v1/clones/{id}", 404))

            // Errors: each with its status and {"error": {"code", "message"}}.
            func expectError(_ method: String, _ path: String, route: String? = nil, _ body: String? = nil, status: Int, code: String) throws {
                let reply = try server.request(method, path, route: route, body)
                #expect(reply.status == status, "\(method) \(path) \(body ?? ""): \(reply.status) \(String(decoding: reply.body, as: UTF8.self))")
                let error = (server.json(reply) as? [String: Any])?["error"] as? [String: Any]
                #expect(error?["code"] as? String == code, "\(method) \(path): \(String(decoding: reply.body, as: UTF8.self))")
                #expect((error?["message"] as? String)?.isEmpty == false)
            }
            try expectError("GET", "/v1/clones/nope", route: "/v1/clones/{id}", status: 404, code: "notFound")
            // The API takes a full ID or a name: a prefix reaches nothing, and nothing is removed.
            try expectError("GET", "/v1/clones/\(clone.id.prefix(4))", route: "/v1/clones/{id}", status: 404, code: "notFound")
            try expectError("DELETE", "/v1/clones/\(clone.id.prefix(4))", route: "/v1/clones/{id}", status: 404, code: "notFound")
            #expect(try server.request("GET", "/v1/clones/\(clone.id)", route: "/v1/clones/{id}").status == 200, "the clone is still there")
            // Path parameters are percent-decoded.
            #expect(try server.request("GET", "/v1/clones/api%2D1", route: "/v1/clones/{id}").status == 200)
            // A body over the limit is 413, not a 500 with NIO's words.
            let huge = #"{"template": "busybox", "name": ""# + String(repeating: "x", count: 70_000) + #""}"#
            let tooLarge = try server.request("POST", "/v1/clones", huge)
            #expect(tooLarge.status == 413, "\(tooLarge.status) \(String(decoding: tooLarge.body, as: UTF8.self))")
            try expectError("PUT", "/v1/pools/busybox", route: "/v1/pools/{template}", #"{"size": 2, "szie": 3}"#, status: 400, code: "invalidArgument")
            // A method the path does not have is 405 with Allow (was 404); a body that says it is not
            // JSON is 415.
            let wrongMethod = try server.client.request("PUT", "/v1/clones")
            #expect(wrongMethod.status == 405 && wrongMethod.headers["allow"] == "GET, POST", "\(wrongMethod.status) \(wrongMethod.headers)")
            #expect(try server.client.request("PATCH", "/v1/clones/api-1").headers["allow"] == "DELETE, GET")
            let plain = try ShortCommand.run("/usr/bin/python3", ["-c", """
                import socket, sys
                s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
                body = b'{"template": "busybox"}'
                s.sendall(b"POST /v1/clones HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: text/plain\\r\\nContent-Length: " + str(len(body)).encode() + b"\\r\\nConnection: close\\r\\n\\r\\n" + body)
                print(s.recv(65536).split(b"\\r\\n")[0].decode())
                """, "\(server.store.root)/serve.sock"])
            #expect(plain.stdout.hasPrefix("HTTP/1.1 415"), "\(plain.stdout) \(plain.stderr)")
            try expectError("POST", "/v1/clones", #"{"template": "nope"}"#, status: 404, code: "notFound")
            try expectError("POST", "/v1/clones", #"{"name": "x"}"#, status: 400, code: "invalidArgument")
            try expectError("POST", "/v1/clones", #"{"template": "busybox", "nics": [{"backend": "tap"}]}"#, status: 400, code: "invalidArgument")
            // The CLI's spec strings are the CLI's: the API takes objects, and says so.
            try expectError("POST", "/v1/clones", #"{"template": "busybox", "nics": ["user"]}"#, status: 400, code: "invalidArgument")
            try expectError("POST", "/v1/clones", #"{"template": "busybox", "disks": [{"path": "/x.img,readonly=off"}]}"#, status: 400, code: "invalidArgument")
            try expectError("POST", "/v1/clones", #"{"template": "busybox", "name": "api-1", "no_pool": true, "cow_limit": "8M"}"#, status: 409, code: "exists")
            try expectError("POST", "/v1/clones", #"{"template": "busybox", "cow_limt": "64M"}"#, status: 400, code: "invalidArgument")
            try expectError("POST", "/v1/clones", #"{"template": "busybox", "tcg_tb_size": 0}"#, status: 400, code: "invalidArgument")
            try expectError("POST", "/v1/clones", #"{"template": "busybox", "timeout": 0}"#, status: 400, code: "invalidArgument")
            // Refused the same way by the CLI: the same sentence.
            let viaCLI = try CLI.run(["clone", "busybox", "--tcg-tb-size", "0"] + server.store.arguments)
            let viaAPI = try server.request("POST", "/v1/clones", #"{"template": "busybox", "tcg_tb_size": 0}"#)
            let apiMessage = ((server.json(viaAPI) as? [String: Any])?["error"] as? [String: Any])?["message"] as? String
            #expect(viaCLI.status == 64 && apiMessage.map { viaCLI.stderr.contains($0) } == true, "CLI: \(viaCLI.status) \(viaCLI.stderr); API: \(apiMessage ?? "")")
            try expectError("PUT", "/v1/pools/nope", route: "/v1/pools/{template}", #"{"size": 1}"#, status: 404, code: "notFound")
            try expectError("PUT", "/v1/pools/busybox", route: "/v1/pools/{template}", #"{"size": 5000}"#, status: 400, code: "invalidArgument")
            _ = try CLI.run(["settings", "--max-clones", "1"] + server.store.arguments)
            try expectError("POST", "/v1/clones", #"{"template": "busybox", "no_pool": true}"#, status: 429, code: "limitExceeded")
            // A 429 says when to ask again. A retried create is judged before the limits: at the
            // limit it still gets the clone it made (200, created false; CLI 0), and one that
            // differs is told so (409, 73), never 429/69, so a retry loop ends.
            let limited = try server.request("POST", "/v1/clones", #"{"template": "busybox", "no_pool": true}"#)
            #expect(limited.status == 429 && limited.headers["retry-after"] == "1", "\(limited.headers)")
            let retry = try server.request("POST", "/v1/clones", #"{"template": "busybox", "name": "api-1"}"#)
            #expect(retry.status == 200, "\(retry.status) \(String(decoding: retry.body, as: UTF8.self))")
            let retried = try JSONCoding.decoder().decode(CloneView.self, from: retry.body)
            #expect(retried.created == false && retried.id == clone.id)
            #expect(try CLI.run(["clone", "busybox", "--name", "api-1", "--no-pool"] + server.store.arguments).status == 0)
            try expectError("POST", "/v1/clones", #"{"template": "busybox", "name": "api-1", "cow_limit": "8M"}"#, status: 409, code: "exists")
            #expect(try CLI.run(["clone", "busybox", "--name", "api-1", "--cow-limit", "8M"] + server.store.arguments).status == 73)
            _ = try CLI.run(["settings", "--max-clones", "64"] + server.store.arguments)

            // Pause and resume, as the CLI's: the clone's live state says so, and QEMU agrees.
            let paused = try server.request("POST", "/v1/clones/\(freshClone.id)/pause", route: "/v1/clones/{id}/pause")
            #expect(paused.status == 200, "\(String(decoding: paused.body, as: UTF8.self))")
            let pausedView = try JSONCoding.decoder().decode(CloneView.self, from: paused.body)
            #expect(pausedView.state == .paused && pausedView.pausedBy == .user)
            let resumed = try server.request("POST", "/v1/clones/\(freshClone.id)/resume", route: "/v1/clones/{id}/resume")
            let resumedView = try JSONCoding.decoder().decode(CloneView.self, from: resumed.body)
            #expect(resumed.status == 200 && resumedView.state == .running)
            #expect(try CLI.run(["send", freshClone.id, "ping"] + server.store.arguments).stdout == "pong\n", "the guest runs again")
            try expectError("POST", "/v1/clones/no-such-clone/pause", route: "/v1/clones/{id}/pause", status: 404, code: "notFound")

            // exec needs a guest agent, which the busybox guest has not.
            try expectError("POST", "/v1/clones/\(freshClone.id)/exec", route: "/v1/clones/{id}/exec", #"{"command": ["true"]}"#, status: 409, code: "invalidState")
            try expectError("POST", "/v1/clones/\(freshClone.id)/exec", route: "/v1/clones/{id}/exec", #"{"command": ["true"], "shell": true}"#, status: 400, code: "invalidArgument")

            // verify and gc, as the CLI's.
            let verified = try server.request("POST", "/v1/templates/busybox/verify", route: "/v1/templates/{name}/verify")
            let verification = server.json(verified) as? [String: Any]
            #expect(verified.status == 200 && verification?["ok"] as? Bool == true && (verification?["files"] as? [Any])?.count == 2, "\(String(decoding: verified.body, as: UTF8.self))")
            try expectError("POST", "/v1/templates/nope/verify", route: "/v1/templates/{name}/verify", status: 404, code: "notFound")
            let collected = try server.request("POST", "/v1/gc")
            #expect(collected.status == 200 && (server.json(collected) as? [String: Any])?["problems"] != nil, "\(String(decoding: collected.body, as: UTF8.self))")

            // Devices, as device list/add/rm: objects (or the CLI's strings), checked by one parser.
            let devicesRoute = "/v1/clones/{id}/devices"
            let listedDevices = try server.request("GET", "/v1/clones/\(freshClone.id)/devices", route: devicesRoute)
            #expect(listedDevices.status == 200 && (server.json(listedDevices) as? [Any])?.count == 1)
            let images = try TestImages()
            defer { images.remove() }
            let plugged = try server.request("POST", "/v1/clones/\(freshClone.id)/devices", route: devicesRoute, #"{"disks": [{"path": "\#(images.raw)", "readonly": true}], "nics": [{"backend": "user"}], "wait": true}"#)
            #expect(plugged.status == 201, "\(String(decoding: plugged.body, as: UTF8.self))")
            #expect((try? JSONCoding.decoder().decode([AttachedDevice].self, from: plugged.body))?.map(\.id).sorted() == ["disk0", "nic1"])
            let afterPlug = try JSONCoding.decoder().decode(CloneView.self, from: try server.request("GET", "/v1/clones/\(freshClone.id)", route: "/v1/clones/{id}").body)
            #expect(afterPlug.devicesReady == true, "wait: true answered once the guest saw them")
            let deviceRoute = "/v1/clones/{id}/devices/{device}"
            #expect(try server.request("DELETE", "/v1/clones/\(freshClone.id)/devices/disk0", route: deviceRoute).status == 200)
            try expectError("DELETE", "/v1/clones/\(freshClone.id)/devices/disk0", route: deviceRoute, status: 404, code: "notFound")
            try expectError("DELETE", "/v1/clones/\(freshClone.id)/devices/..%2Fx", route: deviceRoute, status: 404, code: "notFound")
            try expectError("POST", "/v1/clones/\(freshClone.id)/devices", route: devicesRoute, #"{"disks": [{"path": "/x.img,readonly=off"}]}"#, status: 400, code: "invalidArgument")
            try expectError("POST", "/v1/clones/\(freshClone.id)/devices", route: devicesRoute, #"{}"#, status: 400, code: "invalidArgument")
            try expectError("POST", "/v1/clones/\(freshClone.id)/devices", route: devicesRoute, #"{"nics": [{"backend": "user"}], "colour": "red"}"#, status: 400, code: "invalidArgument")
            try expectError("GET", "/v1/clones/nope/devices", route: devicesRoute, status: 404, code: "notFound")

            // Settings, whole: what settings --json shows, replaced by a PUT.
            let settings = try server.request("GET", "/v1/settings")
            #expect(settings.status == 200 && (server.json(settings) as? [String: Any])?["max_clones"] as? Int == 64)
            let put = try server.request("PUT", "/v1/settings", #"{"max_clones": 32, "over_limit_action": "kill"}"#)
            #expect(put.status == 200 && (server.json(put) as? [String: Any])?["over_limit_action"] as? String == "kill")
            #expect(try CLI.run(["settings", "--json"] + server.store.arguments).stdout.contains("\"max_clones\":32"), "the CLI sees what the API set")
            try expectError("PUT", "/v1/settings", #"{"max_clonez": 1}"#, status: 400, code: "invalidArgument")
            try expectError("PUT", "/v1/settings", #"{"max_clones": -1}"#, status: 400, code: "invalidArgument")
            #expect(try server.request("PUT", "/v1/settings", #"{"max_clones": 64}"#).status == 200)

            // Templates: made in the background and announced in the events, removed, refused.
            var recipe = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Checkout.busyboxRecipe))) as? [String: Any])
            let recipeDirectory = URL(fileURLWithPath: Checkout.busyboxRecipe).deletingLastPathComponent().path
            recipe["kernel"] = "\(recipeDirectory)/\(recipe["kernel"] as? String ?? "")"
            recipe["initrd"] = "\(recipeDirectory)/\(recipe["initrd"] as? String ?? "")"
            func templateBody(_ name: String, _ recipe: [String: Any]) throws -> String {
                String(decoding: try JSONSerialization.data(withJSONObject: ["name": name, "recipe": recipe]), as: UTF8.self)
            }
            let creating = try server.request("POST", "/v1/templates", try templateBody("api-made", recipe))
            #expect(creating.status == 202 && creating.headers["location"] == "/v1/templates/api-made", "\(creating.status) \(String(decoding: creating.body, as: UTF8.self))")
            let since = (server.json(creating) as? [String: Any])?["since"] as? Int ?? 0
            var broken = recipe
            broken["kernel"] = "/nonexistent/vmlinuz"
            #expect(try server.request("POST", "/v1/templates", try templateBody("api-fails", broken)).status == 202)
            let outcomes = await eventually(timeout: .seconds(120)) {
                let events = (try? TemplateStore(root: server.store.root).events.read(after: UInt64(since)).events) ?? []
                return events.contains { $0.type == .templateAdded && $0.template == "api-made" } && events.contains { $0.type == .templateFailed && $0.template == "api-fails" }
            }
            #expect(outcomes, "template.added for the one made, template.failed for the one that could not be")
            let failure = try TemplateStore(root: server.store.root).events.read(after: UInt64(since)).events.first { $0.type == .templateFailed }
            #expect(failure?.reason?.contains("vmlinuz") == true, "\(String(describing: failure))")
            #expect(try server.request("GET", "/v1/templates/api-made", route: "/v1/templates/{name}").status == 200)
            let failed = try server.request("GET", "/v1/templates/api-fails", route: "/v1/templates/{name}")
            #expect(failed.status == 202 && (server.json(failed) as? [String: Any])?["state"] as? String == "failed", "a failed creation says so: \(String(decoding: failed.body, as: UTF8.self))")
            #expect(try server.request("DELETE", "/v1/templates/api-fails", route: "/v1/templates/{name}").status == 200, "and is forgotten once removed")
            try expectError("GET", "/v1/templates/api-fails", route: "/v1/templates/{name}", status: 404, code: "notFound")
            try expectError("POST", "/v1/templates", try templateBody("api-made", recipe), status: 409, code: "exists")
            var relative = recipe
            relative["kernel"] = "out/vmlinuz"
            try expectError("POST", "/v1/templates", try templateBody("api-relative", relative), status: 400, code: "invalidArgument")
            try expectError("POST", "/v1/templates", #"{"name": "x", "recipe": {"kernel": "/k"}, "colour": 1}"#, status: 400, code: "invalidArgument")
            try expectError("POST", "/v1/templates", #"{"name": "../x", "recipe": {"kernel": "/k"}}"#, status: 400, code: "invalidArgument")
            let removedTemplate = try server.request("DELETE", "/v1/templates/api-made", route: "/v1/templates/{name}")
            #expect(removedTemplate.status == 200 && (server.json(removedTemplate) as? [String: Any])?["removed_clones"] as? [Any] != nil)
            try expectError("DELETE", "/v1/templates/api-made", route: "/v1/templates/{name}", status: 404, code: "notFound")
            try expectError("DELETE", "/v1/templates/busybox", route: "/v1/templates/{name}", status: 409, code: "busy")

            let removed = try server.request("DELETE", "/v1/clones/\(freshClone.id)", route: "/v1/clones/{id}")
            #expect(removed.status == 200 && String(decoding: removed.body, as: UTF8.self).contains(freshClone.id))
            try expectError("POST", "/v1/clones/\(freshClone.id)/resume", route: "/v1/clones/{id}/resume", status: 404, code: "notFound")
            try expectError("DELETE", "/v1/clones/\(freshClone.id)", route: "/v1/clones/{id}", status: 404, code: "notFound")

            // The pool gave a member away: the server fills it again; a bigger size is filled too.
            let resized = try server.request("PUT", "/v1/pools/busybox", route: "/v1/pools/{template}", #"{"size": 3}"#)
            #expect(resized.status == 200)
            #expect(await eventually(timeout: .seconds(60)) {
                (try? server.request("GET", "/v1/pools")).map { String(decoding: $0.body, as: UTF8.self).contains("\"ready\" : 3") } ?? false
            }, "the server refilled the pool to its new size")
            // A rendering is served again for up to 5 s (APIMetrics.maxAge): scraped until one
            // made after the requests above comes.
            var metrics = try server.request("GET", "/metrics")
            let deadline = ContinuousClock.now + .seconds(20)
            while ContinuousClock.now < deadline, !String(decoding: metrics.body, as: UTF8.self).contains("vmtemplate_pool_ready{template=\"busybox\"} 3") {
                try await Task.sleep(for: .milliseconds(500))
                metrics = try server.request("GET", "/metrics")
            }
            let text = String(decoding: metrics.body, as: UTF8.self)
            #expect(metrics.status == 200 && metrics.headers["content-type"]?.hasPrefix("text/plain") == true)
            // Read by Prometheus' own parser (python3-prometheus-client), not by string matching.
            let scraped = try PrometheusText.parse(text)
            #expect(scraped.value("vmtemplate_pool_ready", ["template": "busybox"]) == 3, "\(text)")
            #expect(scraped.value("vmtemplate_clone_duration_seconds_count", ["source": "pool"]) == 1)
            #expect(scraped.value("vmtemplate_clone_duration_seconds_bucket", ["source": "pool", "le": "+Inf"]) == 1)
            #expect(scraped.value("vmtemplate_errors_total", ["error": "limitExceeded"]) == 2)
            // Every error's series from the start (0 until it happens), the version, and the
            // per-template sums beside the per-clone series this server was asked for.
            #expect(scraped.value("vmtemplate_errors_total", ["error": "integrityFailure"]) == 0)
            #expect(scraped.value("vmtemplate_enforcements_total", ["action": "kill", "outcome": "escalated"]) == 0)
            #expect(scraped.value("vmtemplate_build_info", ["version": VMTemplateVersion.current]) == 1)
            #expect(scraped.value("vmtemplate_pool_handouts_total", ["template": "busybox"]) == 1, "one API create was served by the pool")
            #expect((scraped.value("vmtemplate_qemu_private_bytes", ["template": "busybox"]) ?? 0) > 0)
            #expect(scraped.value("vmtemplate_api_requests_total", ["code": "429"]) == 2)
            #expect(scraped.types["vmtemplate_clone_duration_seconds"] == "histogram" && scraped.types["vmtemplate_clone_cow_bytes"] == "gauge")
            #expect(scraped.samples.contains { $0.name == "vmtemplate_clone_qemu_private_bytes" && $0.labels["template"] == "busybox" && $0.value > 0 })
            #expect(scraped.samples.filter { $0.name == "vmtemplate_clones" }.reduce(0) { $0 + $1.value } >= 4)
            // The file for node_exporter's textfile collector: the same families, rewritten whole.
            let file = try PrometheusText.parse(String(contentsOfFile: "\(server.store.root)/metrics.prom", encoding: .utf8))
            #expect(Set(file.types.keys) == Set(scraped.types.keys))

            // A member of the socket's group: clones of its own, no devices, no pool sizes, and
            // only its own clones removed.
            func asUser(_ user: String, group: String, _ arguments: [String]) throws -> ShortCommand.Output {
                try ShortCommand.run("/usr/bin/setpriv", ["--reuid=\(user)", "--regid=\(group)", "--clear-groups", "--", Checkout.binary, "api"] + arguments + ["--socket", "\(server.store.root)/serve.sock"])
            }
            let member = try asUser("nobody", group: "nogroup", ["POST", "/v1/clones", #"{"template": "busybox"}"#])
            #expect(member.status == 0, "\(member.stdout) \(member.stderr)")
            server.seen.append(("POST", "/v1/clones", 201))
            let memberClone = try JSONCoding.decoder().decode(CloneView.self, from: Data(member.stdout.utf8))
            for (arguments, route) in [
                (["POST", "/v1/clones", #"{"template": "busybox", "nics": [{"backend": "user"}]}"#], "/v1/clones"),
                (["POST", "/v1/clones", #"{"template": "busybox", "tcg_tb_size": 64}"#], "/v1/clones"),
                (["PUT", "/v1/pools/busybox", #"{"size": 1}"#], "/v1/pools/{template}"),
                (["DELETE", "/v1/clones/\(clone.id)"], "/v1/clones/{id}"),
                (["POST", "/v1/clones/\(clone.id)/pause"], "/v1/clones/{id}/pause"),
                (["POST", "/v1/gc"], "/v1/gc"),
                (["POST", "/v1/clones/\(memberClone.id)/devices", #"{"nics": [{"backend": "user"}]}"#], "/v1/clones/{id}/devices"),
                (["PUT", "/v1/settings", #"{"max_clones": 1}"#], "/v1/settings"),
                (["POST", "/v1/templates", #"{"name": "m", "recipe": {"kernel": "/k"}}"#], "/v1/templates"),
                (["DELETE", "/v1/templates/busybox"], "/v1/templates/{name}"),
            ] {
                let refused = try asUser("nobody", group: "nogroup", arguments)
                #expect(refused.status != 0 && refused.stdout.contains("permissionDenied"), "\(arguments): \(refused.stdout) \(refused.stderr)")
                server.seen.append((arguments[0], route, 403))
            }
            #expect(try asUser("nobody", group: "nogroup", ["DELETE", "/v1/clones/\(memberClone.id)"]).status == 0, "a member removes its own clone")
            server.seen.append(("DELETE", "/v1/clones/{id}", 200))

            // A caller who can reach the socket but is neither the owner nor in its group (the
            // socket's mode loosened by somebody): refused by its peer credentials.
            chmod("\(server.store.root)/serve.sock", 0o666)
            let stranger = try asUser("daemon", group: "daemon", ["GET", "/v1/pools"])
            #expect(stranger.status != 0 && stranger.stdout.contains("permissionDenied") && stranger.stdout.contains("may not use this server"), "\(stranger.stdout) \(stranger.stderr)")
            server.seen.append(("GET", "/v1/pools", 403))

            // The OpenAPI document lists exactly the server's routes, and every status seen here.
            let document = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Self.openAPIPath))) as? [String: Any])
            let paths = try #require(document["paths"] as? [String: [String: Any]])
            let documented = Set(paths.flatMap { path, operations in operations.keys.filter { $0 != "parameters" }.map { "\($0.uppercased()) \(path)" } })
            #expect(documented == Set(APIServer.routes))
            // Every operation has an operationId, unique: what code generators name methods by.
            let operationIDs = paths.values.flatMap { $0.compactMap { key, operation in key == "parameters" ? nil : (operation as? [String: Any])?["operationId"] as? String ?? "" } }
            #expect(!operationIDs.contains("") && Set(operationIDs).count == operationIDs.count && operationIDs.count == documented.count, "\(operationIDs)")
            for (method, route, status) in server.seen {
                let responses = (paths[route]?[method.lowercased()] as? [String: Any])?["responses"] as? [String: Any]
                #expect(responses?[String(status)] != nil, "\(method) \(route) answered \(status), which docs/api.openapi.json does not list")
            }
            // A request ID: the caller's (a short token) echoed, else the server's own; both logged.
            let traced = try server.client.request("GET", "/v1/version", headers: ["X-Request-Id": "trace-42"])
            #expect(traced.headers["x-request-id"] == "trace-42")
            let untraced = try server.client.request("GET", "/v1/version", headers: ["X-Request-Id": "not a token; drop table"])
            let ownID = try #require(untraced.headers["x-request-id"])
            #expect(ownID != "not a token; drop table" && !ownID.isEmpty, "a value that is no short token is not echoed")
            stopped = server.stop()
            // One format: every line TIME LEVEL MESSAGE key=value; each request with its status,
            // duration and ID.
            let lines = stopped?.stderr.split(separator: "\n") ?? []
            #expect(lines.allSatisfy { $0.split(separator: " ").count >= 3 && $0.hasPrefix("20") && ($0.contains(" info ") || $0.contains(" warning ") || $0.contains(" error ")) }, "\(lines.filter { !$0.hasPrefix("20") }.prefix(5))")
            #expect(lines.contains { $0.contains("GET /v1/version from uid 0") && $0.contains("request_id=trace-42") && $0.contains("status=200") && $0.contains("duration_ms=") })
            #expect(lines.contains { $0.contains("request_id=\(ownID)") })
            #expect(stopped?.stderr.contains("from uid 0") == true, "requests are logged with the caller's uid")
            #expect(stopped?.stderr.contains("from uid 65534") == true)
            #expect(stopped?.stderr.contains("refused GET /v1/pools from uid 1 ") == true, "a refused caller is logged")
        }
    }
}
