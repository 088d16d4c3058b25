import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

extension RealGuests {
    /// Accounting, limits and enforcement on real clones of the shared busybox template.
    @Suite("scheduler on real clones", .serialized)
    struct SchedulerIntegrationTests {
        struct Listing: Decodable {
            struct Clone: Decodable {
                var id: String
                var name: String
                var state: String
                var pid: Int32?
                var cow_bytes: UInt64?
                var cow_pages: UInt64?
                var private_bytes: UInt64?
            }
            struct Summary: Decodable {
                var in_use_bytes: UInt64
                var full_copy_bytes: UInt64
            }
            var clones: [Clone]
            var summary: Summary
        }

        func list(_ store: TemporaryStore) throws -> Listing {
            let result = try CLI.run(["list", "--json"] + store.arguments)
            try #require(result.status == 0, "list: \(result.stderr)")
            return try JSONDecoder().decode(Listing.self, from: Data(result.stdout.utf8))
        }

        func clone(_ store: TemporaryStore, _ arguments: [String]) throws {
            let result = try CLI.run(["clone", SharedTemplate.name] + arguments + store.arguments)
            try #require(result.status == 0, "clone: \(result.stderr)")
        }

        func send(_ store: TemporaryStore, _ clone: String, _ request: String) throws -> CommandResult {
            try CLI.run(["send", clone, request, "--timeout", "60"] + store.arguments)
        }

        func cleanUp(_ store: TemporaryStore) {
            _ = try? CLI.run(["rm", "--all"] + store.arguments)
            _ = try? CLI.run(["settings", "--max-clones", "none", "--memory-budget", "none", "--action", "pause"] + store.arguments)
        }

        /// Starts `vmtemplate scheduler` in the background; the caller terminates it.
        func startScheduler(_ store: TemporaryStore) throws -> CLI.Running {
            try CLI.start(["scheduler", "--interval", "0.2"] + store.arguments)
        }

        @Test("a pause that fails pause_attempts rounds in a row (its QEMU stopped, QMP silent) escalates to the stop ladder, recorded as an escalated kill")
        func failedPauseEscalates() async throws {
            let store = try await SharedTemplate.shared.store()
            defer {
                cleanUp(store)
                _ = try? CLI.run(["settings", "--pause-attempts", "3"] + store.arguments)
            }
            #expect(try CLI.run(["settings", "--pause-attempts", "2"] + store.arguments).status == 0)
            try clone(store, ["--name", "silent", "--cow-limit", "8M"])
            #expect(try send(store, "silent", "dirty 16").stdout == "dirtied 16\n")
            let record = try #require(try TemplateStore(root: store.root).findClone("silent"))
            let pid = try #require(record.qemu?.pid)
            kill(pid, SIGSTOP)
            defer { kill(pid, SIGCONT) }
            var actions: [Enforcement] = []
            for _ in 0..<3 {
                let round = try CLI.run(["scheduler", "--once"] + store.arguments)
                #expect(round.status == 0, "\(round.stderr)")
                actions += round.stdout.split(separator: "\n").compactMap { try? JSONCoding.decoder().decode(Enforcement.self, from: Data($0.utf8)) }
            }
            #expect(actions.map(\.action) == [.pause, .pause, .kill], "\(actions)")
            #expect(actions.map(\.done) == [false, false, true])
            #expect(actions.map(\.attempt) == [1, 2, nil])
            #expect(actions.last?.escalated == true)
            #expect(await eventually { record.qemu?.isAlive == false }, "the clone was stopped")
            let after = try TemplateStore(root: store.root).cloneRecord(record.id)
            #expect(after?.state == .exited && after?.lastEnforcement?.escalated == true)
        }

        @Test("scheduler --once beside a running scheduler refuses (exit 75, naming it) and acts on nothing")
        func onceTakesTheLock() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            let running = try CLI.start(["scheduler", "--interval", "60"] + store.arguments)
            var stopped = false
            defer {
                if !stopped {
                    running.process.terminate()
                    running.process.waitUntilExit()
                }
            }
            // Once it holds the lock (a --once run before that would take the lock first, and the
            // scheduler would refuse to start).
            let lock = try TemplateStore(root: store.root).openLockFile("\(store.root)/scheduler.lock")
            let holds = await eventually(timeout: .seconds(20)) { lock.holders().contains { $0.pid == running.process.processIdentifier } }
            let once = try CLI.run(["scheduler", "--once"] + store.arguments)
            let refused = holds && once.status == 75
            if !refused {
                running.process.terminate()
                running.process.waitUntilExit()
                stopped = true
                Issue.record("the running scheduler: \(running.result().stderr)")
            }
            #expect(refused && once.stderr.contains("another scheduler (process \(running.process.processIdentifier)"), "\(once.status) \(once.stderr)")
            #expect(once.stdout.isEmpty, "no action printed")
        }

        @Test("8 concurrent rm of one clone: one removal, 7 not found")
        func concurrentRemoval() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            try clone(store, ["--name", "contested"])
            let record = try TemplateStore(root: store.root).findClone("contested")
            let id = record.id
            // A QEMU that does not answer `quit` keeps the first removal busy for its grace, so
            // every rm finds the clone still there.
            kill(try #require(record.qemu?.pid), SIGSTOP)
            let removers = try (0..<8).map { _ in try CLI.start(["rm", id, "--grace", "1"] + store.arguments) }
            let results = removers.map { running -> CommandResult in
                running.process.waitUntilExit()
                return running.result()
            }
            #expect(results.filter { $0.status == 0 && $0.stdout.hasPrefix("removed \(id)") }.count == 1, "\(results.map { ($0.status, $0.stdout, $0.stderr) })")
            #expect(results.filter { $0.status == 66 }.count == 7, "\(results.map { ($0.status, $0.stderr) })")
        }

        @Test("pause then resume round-trips; list and inspect say the user paused it; the scheduler does not resume it")
        func pauseAndResume() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            try clone(store, ["--name", "napper", "--cow-limit", "8M"])
            #expect(try CLI.run(["pause", "napper"] + store.arguments).stdout.hasPrefix("paused "))
            let listed = try CLI.run(["list"] + store.arguments)
            #expect(listed.stdout.contains("paused (user)"), "\(listed.stdout)")
            #expect(try CLI.run(["inspect", "napper", "--json"] + store.arguments).stdout.contains("\"paused_by\":\"user\""))
            #expect(try send(store, "napper", "ping").status == 76, "a paused guest is refused, not waited for")
            #expect(try CLI.run(["scheduler", "--once"] + store.arguments).status == 0)
            #expect(try list(store).clones.first { $0.name == "napper" }?.state == "paused", "the scheduler left it paused")
            #expect(try CLI.run(["resume", "napper"] + store.arguments).status == 0)
            #expect(try send(store, "napper", "ping").stdout == "pong\n")
            #expect(try TemplateStore(root: store.root).findClone("napper").pausedBy == nil)
        }

        @Test("list shows a busy clone's copy-on-write while an idle sibling stays small")
        func accounting() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            try clone(store, ["--name", "busy"])
            try clone(store, ["--name", "idle"])
            #expect(try send(store, "busy", "dirty 64").stdout == "dirtied 64\n")
            let listing = try list(store)
            let busy = try #require(listing.clones.first { $0.name == "busy" })
            let idle = try #require(listing.clones.first { $0.name == "idle" })
            #expect((busy.cow_bytes ?? 0) >= 64 * 1024 * 1024)
            #expect(busy.cow_pages == (busy.cow_bytes ?? 0) / 4096)
            #expect((idle.cow_bytes ?? .max) < 8 * 1024 * 1024)
            #expect((idle.private_bytes ?? 0) > 0)
            #expect(listing.summary.full_copy_bytes > listing.summary.in_use_bytes)
        }

        @Test("a clone over its limit is paused, its sibling keeps running, the template is unchanged", arguments: [OverLimitAction.pause, .kill])
        func enforcement(action: OverLimitAction) async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            let manifest = try TemplateStore(root: store.root).template(named: try EntityName(SharedTemplate.name)).manifest
            try clone(store, ["--name", "greedy", "--cow-limit", "32M", "--over-limit", action.rawValue])
            try clone(store, ["--name", "sibling"])
            let scheduler = try startScheduler(store)
            defer {
                scheduler.process.terminate()
                scheduler.process.waitUntilExit()
            }
            // The guest may be stopped before it answers: the reply does not matter here.
            _ = try? CLI.run(["send", "greedy", "dirty 64", "--timeout", "5"] + store.arguments)
            let expected = action == .pause ? "paused" : "exited"
            #expect(await eventually(timeout: .seconds(30)) {
                (try? list(store))?.clones.first { $0.name == "greedy" }?.state == expected
            })
            let listing = try list(store)
            #expect(listing.clones.first { $0.name == "sibling" }?.state == "running")
            #expect(try send(store, "sibling", "ping").stdout == "pong\n")
            #expect(try FileDigest.sha256(path: "\(store.templateDirectory(SharedTemplate.name))/memory") == manifest.memory.sha256)

            // list shows the limit, the action and what was done, in JSON and to people.
            let listed = try CLI.run(["list", "--json"] + store.arguments)
            #expect(listed.stdout.contains("\"cow_limit_bytes\":33554432") && listed.stdout.contains("\"over_limit_action\":\"\(action.rawValue)\""))
            let table = try CLI.run(["list"] + store.arguments).stdout
            let greedyRow = table.split(separator: "\n").first { $0.contains("greedy") }.map(String.init) ?? ""
            #expect(table.contains("LIMIT") && greedyRow.contains("32 MiB") && greedyRow.contains(action == .pause ? "paused " : "killed "), "\(table)")

            let inspect = try CLI.run(["inspect", "greedy", "--json"] + store.arguments)
            #expect(inspect.stdout.contains("\"last_enforcement\":{"))
            #expect(inspect.stdout.contains("\"action\":\"\(action.rawValue)\""))
            scheduler.process.terminate()
            scheduler.process.waitUntilExit()
            let log = scheduler.result().stdout
            #expect(log.contains("\"clone\"") && log.contains("\"limit_bytes\":33554432"), "scheduler log: \(log)")

            if action == .pause {
                let refused = try CLI.run(["resume", "greedy"] + store.arguments)
                #expect(refused.status != 0 && refused.stderr.contains("over its limit"))
                let resumed = try CLI.run(["resume", "greedy", "--cow-limit", "1G"] + store.arguments)
                #expect(resumed.status == 0, "resume: \(resumed.stderr)")
                #expect(try list(store).clones.first { $0.name == "greedy" }?.state == "running")
            }
        }

        @Test("a scheduler killed and started again carries on; only one runs per store")
        func schedulerRestart() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            let first = try startScheduler(store)
            #expect(await eventually(timeout: .seconds(10)) { FileManager.default.fileExists(atPath: "\(store.root)/scheduler.lock") })
            try await Task.sleep(for: .milliseconds(300))
            let second = try CLI.run(["scheduler", "--interval", "0.2"] + store.arguments)
            #expect(second.status != 0 && second.stderr.contains("another scheduler"))
            kill(first.process.processIdentifier, SIGKILL)
            first.process.waitUntilExit()
            _ = first.result()

            try clone(store, ["--name", "late", "--cow-limit", "16M"])
            _ = try? CLI.run(["send", "late", "dirty 32", "--timeout", "5"] + store.arguments)
            let restarted = try startScheduler(store)
            defer {
                restarted.process.terminate()
                restarted.process.waitUntilExit()
            }
            #expect(await eventually(timeout: .seconds(30)) {
                (try? list(store))?.clones.first { $0.name == "late" }?.state == "paused"
            })
        }

        @Test("admission: the store's clone count and memory budget are enforced with clear errors")
        func admission() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            #expect(try CLI.run(["settings", "--max-clones", "1"] + store.arguments).status == 0)
            try clone(store, ["--name", "one"])
            let refused = try CLI.run(["clone", SharedTemplate.name] + store.arguments)
            #expect(refused.status != 0 && refused.stderr.contains("at most 1 live clones"))

            #expect(try CLI.run(["settings", "--max-clones", "none", "--memory-budget", "400M"] + store.arguments).status == 0)
            // "one" commits 256 MiB + QEMU's reserve; another full one does not fit, a limited one does.
            let tooBig = try CLI.run(["clone", SharedTemplate.name] + store.arguments)
            #expect(tooBig.status != 0 && tooBig.stderr.contains("memory budget"))
            try clone(store, ["--name", "small", "--cow-limit", "32M"])

            // A limit no record may hold would drop its clone out of every count: refused.
            let huge = try CLI.run(["clone", SharedTemplate.name, "--cow-limit", "5T"] + store.arguments)
            #expect(huge.status == 64 && huge.stderr.contains("more than any guest has"), "\(huge.stderr)")
            // Raising a clone's limit is a bigger commitment: admitted like a new clone.
            let raised = try CLI.run(["resume", "small", "--cow-limit", "256M"] + store.arguments)
            #expect(raised.status == 69 && raised.stderr.contains("memory budget"), "\(raised.stderr)")

            let badSize = try CLI.run(["clone", SharedTemplate.name, "--cow-limit", "12Q"] + store.arguments)
            #expect(badSize.status != 0 && badSize.stderr.contains("invalid size '12Q'"))
            let badSetting = try CLI.run(["settings", "--max-clones", "lots"] + store.arguments)
            #expect(badSetting.status != 0)
            #expect(try list(store).clones.count == 2)
        }

        @Test("admission counts from the live index: a dead clone's entry never holds a place, a lost or garbled index is rebuilt, rm and gc keep it exact")
        func liveIndex() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            let indexPath = "\(store.root)/live.json"
            struct Index: Decodable { var clones: [String: UInt64] }
            func indexed() throws -> Set<String> {
                Set(try JSONDecoder().decode(Index.self, from: Data(contentsOf: URL(fileURLWithPath: indexPath))).clones.keys)
            }
            func id(_ name: String) throws -> String { try #require(try list(store).clones.first { $0.name == name }?.id) }

            #expect(try CLI.run(["settings", "--max-clones", "2"] + store.arguments).status == 0)
            try clone(store, ["--name", "doomed"])
            try clone(store, ["--name", "kept"])
            let doomed = try id("doomed"), kept = try id("kept")
            #expect(try indexed() == [doomed, kept])

            // A QEMU that dies leaves its clone's entry: admission must not refuse on its account.
            let pid = try #require(try list(store).clones.first { $0.id == doomed }?.pid)
            kill(pid, SIGKILL)
            #expect(await eventually(timeout: .seconds(10)) { (try? list(store))?.clones.first { $0.id == doomed }?.state == "exited" })
            try clone(store, ["--name", "third"])
            let third = try id("third")
            #expect(try indexed() == [kept, third])

            // Lost or garbled: rebuilt from the records, and the limit still holds.
            for garbled in [false, true] {
                unlink(indexPath)
                if garbled { _ = FileManager.default.createFile(atPath: indexPath, contents: Data("{\"clones\": {\"../x\": 1}}".utf8)) }
                let refused = try CLI.run(["clone", SharedTemplate.name] + store.arguments)
                #expect(refused.status == 69 && refused.stderr.contains("at most 2 live clones"), "\(refused.stderr)")
                #expect(try indexed() == [kept, third])
            }

            // rm drops the entry at once; gc drops the directory of the dead one and rebuilds.
            #expect(try CLI.run(["rm", "kept"] + store.arguments).status == 0)
            #expect(try indexed() == [third])
            #expect(try CLI.run(["gc"] + store.arguments).status == 0)
            #expect(try indexed() == [third])
            #expect(try list(store).clones.map(\.id) == [third])
        }

        @Test("a record whose PID now belongs to another process shows as exited and is never killed")
        func reusedPID() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            try clone(store, ["--name", "victim"])
            let templateStore = try TemplateStore(root: store.root)
            let record = try templateStore.findClone("victim")
            let realPID = try #require(record.qemu?.pid)
            // Point the record at this test process, with another start time: a reused PID.
            let impostor = ProcessIdentity(pid: getpid(), startTime: 1)
            try await templateStore.updateClone(record.id) { $0.qemu = impostor }
            #expect(try list(store).clones.first { $0.name == "victim" }?.state == "exited")
            let gc = try CLI.run(["gc"] + store.arguments)
            #expect(gc.status == 0)
            #expect(kill(getpid(), 0) == 0, "gc must not kill the process that reused the PID")
            kill(realPID, SIGKILL)
        }

        @Test("a record naming a live process that is not its QEMU: rm refuses and signals nothing")
        func recordNamingAnotherProcess() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            try clone(store, ["--name", "claims"])
            let templateStore = try TemplateStore(root: store.root)
            let record = try templateStore.findClone("claims")
            let real = try #require(record.qemu)
            let bystander = Process()
            bystander.executableURL = URL(fileURLWithPath: "/bin/sleep")
            bystander.arguments = ["60"]
            bystander.standardOutput = FileHandle.nullDevice
            bystander.standardError = FileHandle.nullDevice
            try bystander.run()
            defer { bystander.terminate() }
            let identity = try #require(ProcessIdentity.current(pid: bystander.processIdentifier))
            try await templateStore.updateClone(record.id) { $0.qemu = identity }
            let rm = try CLI.run(["rm", "claims"] + store.arguments)
            #expect(rm.status != 0)
            #expect(rm.stderr.contains("not its QEMU"), "\(rm.stderr)")
            #expect(bystander.isRunning, "rm must not signal a process that is not the clone's QEMU")
            #expect(FileManager.default.fileExists(atPath: store.cloneDirectory(record.id)))
            // Put the real QEMU back, so the clean-up removes the clone.
            try await templateStore.updateClone(record.id) { $0.qemu = real }
        }

        @Test("a clone whose record cannot be read: gc finds its QEMU by -name, stops it, removes it")
        func unreadableRecord() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            try clone(store, ["--name", "garbled"])
            let record = try TemplateStore(root: store.root).findClone("garbled")
            let pid = try #require(record.qemu?.pid)
            try Data("{ not json".utf8).write(to: URL(fileURLWithPath: "\(store.cloneDirectory(record.id))/record.json"))
            let gc = try CLI.run(["gc", "--json"] + store.arguments)
            #expect(gc.status == 0)
            #expect(gc.stdout.contains(record.id), "\(gc.stdout)")
            #expect(await eventually(timeout: .seconds(5)) { ProcessStat.read(pid: pid).map { $0.state == "Z" } ?? true }, "its QEMU must be stopped")
            #expect(!FileManager.default.fileExists(atPath: store.cloneDirectory(record.id)))
        }

        @Test("a clone whose QMP socket does not answer is reported, without hanging list")
        func unresponsiveQMP() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            try clone(store, ["--name", "held"])
            try clone(store, ["--name", "free"])
            let record = try TemplateStore(root: store.root).findClone("held")
            // QEMU's QMP socket serves one client at a time: holding it makes it unanswerable.
            let holder = try await QMPClient.connect(socketPath: TemplateStore(root: store.root).clonePaths(record.id).qmpSocket, timeout: .seconds(5))
            defer { holder.close() }
            let listing = try list(store)
            #expect(listing.clones.first { $0.name == "held" }?.state == "unresponsive")
            #expect(listing.clones.first { $0.name == "free" }?.state == "running")
        }

        @Test("16 concurrent clone calls make 16 records and 16 running clones")
        func concurrentClones() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { cleanUp(store) }
            let running = try (0..<16).map { index in
                try CLI.start(["clone", SharedTemplate.name, "--name", "c\(index)", "--timeout", "120"] + store.arguments)
            }
            let results = running.map { process in
                process.process.waitUntilExit()
                return process.result()
            }
            #expect(results.allSatisfy { $0.status == 0 }, "\(results.map(\.stderr).filter { !$0.isEmpty })")
            let listing = try list(store)
            #expect(listing.clones.count == 16)
            #expect(listing.clones.filter { $0.state == "running" }.count == 16)
            #expect(Set(listing.clones.map(\.name)).count == 16)
        }
    }
}
