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

/// The reliability suite: attacks on the store by another user, interruptions at random points,
/// QEMUs killed and stopped under vmtemplate's feet, damaged templates and records, generated bad
/// input, and many commands at once. Each scenario counts its trials (docs/reliability.md).
extension RealGuests {
    @Suite("ReliabilityTests", .serialized)
    struct ReliabilityTests {
        // MARK: Helpers

        func store() async throws -> TemporaryStore {
            try await SharedTemplate.shared.store()
        }

        /// The clone directories of `store`, for "nothing half-made is left".
        func cloneEntries(_ store: TemporaryStore) -> Set<String> {
            Set((try? FileManager.default.contentsOfDirectory(atPath: "\(store.root)/clones")) ?? [])
        }

        func removeAll(_ store: TemporaryStore) {
            _ = try? CLI.run(["rm", "--all", "--grace", "1"] + store.arguments)
            _ = try? CLI.run(["gc"] + store.arguments)
        }

        // MARK: Another user attacking the store

        @Test("another user cannot write into the store, hold its lock, or make it act: nothing happens", .enabled(if: Environment.isRoot, "needs root to own the store and to switch to another user"))
        func anotherUser() async throws {
            let store = try await store()
            let tally = Reliability.Tally("another user attacks the store")
            defer { removeAll(store) }
            let before = cloneEntries(store)
            // Writing a record, a directory or the lock: refused by the kernel (0755 root, 0600 lock).
            for path in ["\(store.root)/clones/evil", "\(store.root)/lock", "\(store.root)/settings.json", "\(store.root)/templates/busybox/memory"] {
                let attempt = try Reliability.asNobody(["/bin/sh", "-c", "echo x > '\(path)' || mkdir '\(path)'"])
                tally.trial(failed: false, lost: attempt.status == 0, note: "nobody could write \(path)")
            }
            // The CLI as nobody on root's store: every change refused with a sentence.
            for arguments in [["clone", SharedTemplate.name], ["gc"], ["rm", "--all"], ["settings", "--max-clones", "0"], ["rm-template", SharedTemplate.name]] {
                let result = try Reliability.asNobody([Checkout.binary] + arguments + store.arguments)
                tally.trial(failed: result.status == 0 || !result.stderr.contains("only its owner changes a store"), lost: false, note: "\(arguments): \(result.stderr)")
            }
            // Holding the lock needs opening it, which nobody may (0600 root).
            let hold = try Reliability.asNobody(["/usr/bin/flock", "-n", "\(store.root)/lock", "true"])
            tally.trial(failed: false, lost: hold.status == 0, note: "nobody took the store lock")
            tally.trial(failed: false, lost: cloneEntries(store) != before, note: "the store changed")
            tally.finish()
        }

        @Test("records are claims: a planted record naming another process, escaping the store, stealing a name, or overflowing admission is never acted on")
        func plantedRecords() async throws {
            let store = try await store()
            let tally = Reliability.Tally("planted records")
            defer { removeAll(store) }
            let victim = try Reliability.bystander()
            defer { victim.terminate() }
            let victimIdentity = try #require(ProcessIdentity.current(pid: victim.processIdentifier))
            // Outside the store: a directory a record or a link tries to get removed.
            let outside = "/tmp/vmt-outside-\(UUID().uuidString.prefix(8))"
            try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
            FileManager.default.createFile(atPath: "\(outside)/precious", contents: Data("keep".utf8))
            defer { try? FileManager.default.removeItem(atPath: outside) }

            // 1. Another user's record (as if written before the store was locked down) naming the victim.
            try Reliability.plant(Reliability.recordJSON(id: "aaaaaaaaaaaa", name: "planted", pid: victim.processIdentifier, startTime: victimIdentity.startTime, store: store), id: "aaaaaaaaaaaa", in: store, uid: 65534)
            // 2. The owner's own file, but naming the victim process (a corrupted or forged record).
            try Reliability.plant(Reliability.recordJSON(id: "bbbbbbbbbbbb", name: "forged", pid: victim.processIdentifier, startTime: victimIdentity.startTime, store: store), id: "bbbbbbbbbbbb", in: store)
            // 3. A record whose ID escapes the store, and a link out of it.
            try Reliability.plant(Reliability.recordJSON(id: "cccccccccccc", name: "escape", pid: 1, startTime: 0, store: store, overrides: ["id": "\"../../../\(outside)\""]), id: "cccccccccccc", in: store)
            symlink(outside, "\(store.root)/clones/dddddddddddd")
            // 6. Devices that escape the clone's directory or name QEMU objects of another's.
            try Reliability.plant(Reliability.recordJSON(id: "acacacacacac", name: "devices", pid: victim.processIdentifier, startTime: victimIdentity.startTime, store: store, overrides: ["devices": #"[{"id":"../../../\#(outside)/precious","kind":"disk","bus":"hotplug0","overlay":true}]"#, "state": "\"running\""]), id: "acacacacacac", in: store)
            // 5. A name with terminal escape sequences.
            try Reliability.plant(Reliability.recordJSON(id: "ffffffffffff", name: "\\u001b]0;owned\\u0007\\u001b[2J", pid: victim.processIdentifier, startTime: victimIdentity.startTime, store: store), id: "ffffffffffff", in: store)

            // A real clone whose name a planted record tries to take (older created_at, other sockets).
            let real = try CLI.run(["clone", SharedTemplate.name, "--name", "target", "--json"] + store.arguments)
            #expect(real.status == 0, "\(real.stderr)")
            try Reliability.plant(Reliability.recordJSON(id: "abababababab", name: "target", pid: victim.processIdentifier, startTime: victimIdentity.startTime, store: store), id: "abababababab", in: store, uid: 65534)

            for arguments in [["list"], ["list", "--json"], ["gc"], ["scheduler", "--once"], ["device", "rm", "forged", "disk0"], ["device", "add", "forged", "--nic", "user"], ["device", "rm", "devices", "disk0"], ["device", "list", "devices"], ["rm", "planted"], ["rm", "forged"], ["rm", "escape"], ["rm", "--all"]] {
                let result = try CLI.run(arguments + store.arguments)
                let escaped = result.stdout.contains("\u{1b}") || result.stderr.contains("\u{1b}")
                tally.trial(failed: result.signaled || escaped, lost: !victim.isRunning || !FileManager.default.fileExists(atPath: "\(outside)/precious"),
                            note: "\(arguments): status \(result.status) \(result.stderr)")
            }
            // Re-create the real clone (rm --all above removed it) and check the name is its own.
            let again = try CLI.run(["clone", SharedTemplate.name, "--name", "target"] + store.arguments)
            tally.trial(failed: again.status != 0, lost: false, note: "clone --name target after the plant: \(again.stderr)")
            let ping = try CLI.run(["send", "target", "ping"] + store.arguments)
            tally.trial(failed: ping.stdout != "pong\n", lost: false, note: "send target reached \(ping.stdout) \(ping.stderr)")
            // 4. A huge guest memory, which once overflowed admission: a sentence or a clone, never a trap.
            try Reliability.plant(Reliability.recordJSON(id: "eeeeeeeeeeee", name: "huge", pid: victim.processIdentifier, startTime: victimIdentity.startTime, store: store, overrides: ["guest_memory_bytes": "18446744073709551615"]), id: "eeeeeeeeeeee", in: store)
            let admitted = try CLI.run(["clone", SharedTemplate.name] + store.arguments)
            tally.trial(failed: admitted.signaled, lost: false, note: "clone with a huge record: \(admitted.stderr)")
            tally.trial(failed: false, lost: !victim.isRunning, note: "the bystander was signalled")
            tally.trial(failed: false, lost: !FileManager.default.fileExists(atPath: "\(outside)/precious"), note: "a file outside the store was removed")
            // What is not believed is still reported, and left for a person to look at.
            let listing = try CLI.run(["list"] + store.arguments)
            tally.trial(failed: !listing.stderr.contains("not to the store's owner") || !listing.stderr.contains("not a directory"), lost: false, note: "list did not report the planted entries: \(listing.stderr)")
            tally.finish()
            for id in ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd", "eeeeeeeeeeee", "ffffffffffff", "abababababab", "acacacacacac"] {
                try? FileManager.default.removeItem(atPath: store.cloneDirectory(id))
            }
        }

        @Test("a lock file planted by another user or held too long: a clear refusal naming the holder, never a silent freeze")
        func lockHostage() async throws {
            let store = try TemporaryStore("lock")
            defer { store.remove() }
            let tally = Reliability.Tally("store lock held hostage")
            #expect(try CLI.run(["settings"] + store.arguments).status == 0)
            #expect(try CLI.run(["settings", "--max-clones", "4"] + store.arguments).status == 0)
            // Held by another process of the owner (this test) for longer than the wait: the
            // message names it.
            let holder = try FileLock(path: "\(store.root)/lock", mode: 0o600)
            #expect(holder.tryExclusive())
            let started = ContinuousClock.now
            let blocked = try CLI.run(["settings", "--max-clones", "5"] + store.arguments, environment: ["VMTEMPLATE_LOCK_TIMEOUT": "1"])
            let waited = started.duration(to: .now)
            tally.trial(failed: blocked.status == 0 || !blocked.stderr.contains("held by process \(getpid())") || waited > .seconds(20), lost: false, note: "\(blocked.stderr)")
            holder.unlock()
            if Environment.isRoot {
                // A lock file that belongs to another user is refused at once.
                chown("\(store.root)/lock", 65534, 65534)
                let planted = try CLI.run(["settings", "--max-clones", "5"] + store.arguments)
                tally.trial(failed: planted.status == 0 || !planted.stderr.contains("belongs to uid 65534"), lost: false, note: "\(planted.stderr)")
            }
            tally.finish()
        }

        // MARK: Interruptions

        @Test("SIGKILL of create and clone at random points, then gc: nothing half-made listed, nothing left running")
        func killedAtRandom() async throws {
            let store = try await store()
            defer { removeAll(store) }
            let clones = Reliability.Tally("SIGKILL of clone at a random point, then gc")
            for _ in 0..<Reliability.trials(fast: 3, long: 20) {
                let running = try CLI.start(["clone", SharedTemplate.name, "--timeout", "60"] + store.arguments)
                try await Task.sleep(for: .milliseconds(Int.random(in: 0...60)))
                kill(running.process.processIdentifier, SIGKILL)
                running.process.waitUntilExit()
                _ = running.result()
                let gc = try CLI.run(["gc"] + store.arguments)
                // After gc, a clone is either whole (it finished before the kill) or gone.
                let listed = try CLI.run(["list", "--json"] + store.arguments)
                let object = try? JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [String: Any]
                let states = ((object?["clones"] as? [[String: Any]]) ?? []).compactMap { $0["state"] as? String }
                let halfMade = states.contains { $0 != "running" }
                _ = try CLI.run(["rm", "--all", "--grace", "1"] + store.arguments)
                let leftover = cloneEntries(store)
                // No name of a clone that is gone stays taken (gc prunes the index).
                let names = (try? FileManager.default.contentsOfDirectory(atPath: "\(store.root)/names")) ?? []
                let quiet = await eventually(timeout: .seconds(5)) { QEMUProcesses.using(store.root).isEmpty }
                clones.trial(failed: gc.status != 0 || listed.status != 0, lost: halfMade || !leftover.isEmpty || !names.isEmpty || !quiet, note: "list \(listed.stdout), left \(leftover), names \(names), QEMU \(QEMUProcesses.using(store.root))")
            }
            clones.finish()

            let creates = Reliability.Tally("SIGKILL of create at a random point, then gc")
            let own = try TemporaryStore("kcreate")
            defer { own.remove() }
            for _ in 0..<Reliability.trials(fast: 2, long: 10) {
                let running = try CLI.start(["create", "victim", "--recipe", Checkout.busyboxRecipe] + own.arguments)
                try await Task.sleep(for: .milliseconds(Int.random(in: 0...3000)))
                kill(running.process.processIdentifier, SIGKILL)
                running.process.waitUntilExit()
                _ = running.result()
                let gc = try CLI.run(["gc"] + own.arguments)
                let listed = try CLI.run(["list", "--json"] + own.arguments)
                // A create that finished before the kill made a whole template: fine, and removed.
                let complete = FileManager.default.fileExists(atPath: "\(own.templateDirectory("victim"))/manifest.json")
                let half = FileManager.default.fileExists(atPath: own.templateDirectory("victim")) && !complete
                _ = try? CLI.run(["rm-template", "victim", "--force"] + own.arguments)
                let quiet = await eventually(timeout: .seconds(5)) { QEMUProcesses.using(own.root).isEmpty }
                creates.trial(failed: gc.status != 0 || listed.status != 0, lost: half || !own.stagingEntries().isEmpty || !quiet, note: "staging \(own.stagingEntries()), QEMU \(QEMUProcesses.using(own.root))")
            }
            creates.finish()
        }

        @Test("rm-template --force at random points of serve's pool fill, then the template made again: no member of the removed template is handed out or left running")
        func templateRemovalRacingPoolFill() async throws {
            let own = try TemporaryStore("rmrace")
            defer { own.remove() }
            func run(_ arguments: [String]) throws -> CommandResult { try CLI.run(arguments + own.arguments) }
            try #require(try run(["create", "busybox", "--recipe", Checkout.busyboxRecipe]).status == 0)
            let store = try TemplateStore(root: own.root)
            func identity() throws -> String { try store.template(named: try EntityName("busybox")).manifest.identity }
            let server = try CLI.start(["serve", "--fill-pause", "0"] + own.arguments)
            defer {
                server.process.terminate()
                server.process.waitUntilExit()
                _ = try? run(["rm", "--all", "--grace", "1"])
            }
            let tally = Reliability.Tally("rm-template --force racing a pool fill, template made again")
            for trial in 0..<Reliability.trials(fast: 3, long: 21) {
                let removed = try identity()
                _ = try run(["pool", "set", "busybox", "--size", "3"])
                try await Task.sleep(for: .milliseconds(Int.random(in: 0...1500)))
                let removal = try run(["rm-template", "busybox", "--force"])
                // A member of the removed template must not outlive its removal (a filler that was
                // warming one gives it up at its next step).
                // Found two ways: by the digest its record pins, and by what its QEMU maps (a
                // removed template's RAM file, which the record cannot hide).
                func leftovers() -> [String] {
                    store.clones().records.filter { $0.templateDigest == removed && $0.isLive }.map(\.id)
                        + QEMUProcesses.using(own.root).filter(mapsRemovedTemplate).map { "QEMU \($0)" }
                }
                let cleared = await eventually(timeout: .seconds(30)) { leftovers().isEmpty }
                // Made again under the same name, but another template (another memory size).
                let created = try run(["create", "busybox", "--recipe", Checkout.busyboxRecipe, "--memory", trial % 2 == 0 ? "160M" : "128M"])
                try #require(created.status == 0, "\(created.stderr)")
                let current = try identity()
                _ = try run(["pool", "set", "busybox", "--size", "1"])
                let filled = await eventually(timeout: .seconds(60)) {
                    store.clones().records.contains { $0.state == .pooled && $0.isLive }
                }
                let clone = try run(["clone", "busybox", "--json"])
                let made = try? JSONDecoder().decode(CloneSummaryFields.self, from: Data(clone.stdout.utf8))
                let record = made.flatMap { store.cloneRecord($0.id) }
                let wrong = record?.templateDigest != current
                let mapsRemoved = record?.qemu.map { mapsRemovedTemplate($0.pid) } ?? false
                if let made { _ = try run(["rm", made.id]) }
                _ = try run(["pool", "set", "busybox", "--size", "0"])
                tally.trial(failed: removal.status != 0 || clone.status != 0 || !filled, lost: !cleared || wrong || mapsRemoved,
                            note: "trial \(trial): rm-template \(removal.stderr) clone \(clone.stderr) left \(leftovers()) digest \(record?.templateDigest ?? "none") of \(current), from pool \(made?.from_pool ?? false), maps a removed file \(mapsRemoved)")
            }
            tally.finish()
        }

        /// Whether process `pid` maps a template's RAM file that was removed since.
        func mapsRemovedTemplate(_ pid: Int32) -> Bool {
            let maps = (try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)) ?? ""
            return maps.split(separator: "\n").contains { $0.contains("/templates/") && ($0.contains("(deleted)") || $0.contains("/.removing-")) }
        }

        /// What the race above reads of `clone --json`.
        struct CloneSummaryFields: Decodable {
            var id: String
            var from_pool: Bool
        }

        @Test("a disk that fills while create boots its guest stops create at once with a disk-full error naming the path; nothing is left", .enabled(if: Environment.isRoot, "needs root to mount a small tmpfs"))
        func diskFillsDuringCreate() async throws {
            let mount = "/tmp/vmt-full-\(UUID().uuidString.prefix(8))"
            try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
            _ = try Shell.run("mount -t tmpfs -o size=400M vmt-full \(mount)")
            defer {
                for pid in QEMUProcesses.using(mount) { kill(pid, SIGKILL) }
                _ = try? Shell.run("umount -l \(mount)")
                try? FileManager.default.removeItem(atPath: mount)
            }
            let tally = Reliability.Tally("disk filled by another writer during create")
            let store = "\(mount)/store"
            for trial in 0..<Reliability.trials(fast: 1, long: 5) {
                let filler = "\(mount)/filler-\(trial)"
                let running = try CLI.start(["create", "t", "--recipe", Checkout.busyboxRecipe, "--timeout", "60", "--store", store])
                // Once QEMU boots the guest, another writer takes every byte left.
                let booting = await eventually(timeout: .seconds(30)) { !QEMUProcesses.using(mount).isEmpty }
                _ = try? Shell.run("fallocate -l $(df --output=avail -B1 \(mount) | tail -n 1) \(filler) || true")
                running.process.waitUntilExit()
                let result = running.result()
                let quiet = await eventually(timeout: .seconds(5)) { QEMUProcesses.using(mount).isEmpty }
                let staging = (try? FileManager.default.contentsOfDirectory(atPath: "\(store)/staging")) ?? []
                let published = FileManager.default.fileExists(atPath: "\(store)/templates/t")
                unlink(filler)
                tally.trial(failed: !booting || result.status != 74 || !result.stderr.contains("is full"), lost: !quiet || !staging.isEmpty || published,
                            note: "trial \(trial): exit \(result.status) \(result.stderr), staging \(staging)")
            }
            tally.finish()
        }

        @Test("a SIGKILLed serve leaves its private directory and socket; gc removes them beside the store's socket, and the next serve beside its own")
        func killedServerLitter() async throws {
            let own = try TemporaryStore("ksrv")
            defer { own.remove() }
            let tally = Reliability.Tally("SIGKILL of serve, then gc or the next serve")
            let custom = "\(own.root)/run"
            try FileManager.default.createDirectory(atPath: custom, withIntermediateDirectories: true)
            for trial in 0..<Reliability.trials(fast: 2, long: 10) {
                let socket = trial % 2 == 0 ? "\(own.root)/serve.sock" : "\(custom)/api.sock"
                let server = try CLI.start(["serve", "--socket", socket] + own.arguments)
                let up = await eventually(timeout: .seconds(30)) { FileManager.default.fileExists(atPath: socket) }
                kill(server.process.processIdentifier, SIGKILL)
                server.process.waitUntilExit()
                _ = server.result()
                let directory = FileSystem.split(socket).directory
                func litter() -> [String] {
                    ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasPrefix(".serve-") || $0 == FileSystem.split(socket).name }
                }
                let left = litter()
                var cleaned: CommandResult
                if trial % 2 == 0 {
                    cleaned = try CLI.run(["gc", "--json"] + own.arguments)
                } else {
                    // The next server on the same socket cleans up as it starts.
                    let next = try CLI.start(["serve", "--socket", socket] + own.arguments)
                    _ = await eventually(timeout: .seconds(30)) { (try? UnixHTTPClient(socketPath: socket).request("GET", "/v1/pools"))?.status == 200 }
                    next.process.terminate()
                    next.process.waitUntilExit()
                    cleaned = next.result()
                    cleaned.status = 0
                }
                let after = litter()
                tally.trial(failed: !up || cleaned.status != 0 || left.isEmpty, lost: !after.isEmpty, note: "trial \(trial): before \(left), after \(after): \(cleaned.stdout) \(cleaned.stderr)")
            }
            tally.finish()
        }

        @Test("SIGINT, SIGTERM and SIGHUP during create and clone clean up like a failure and exit non-zero")
        func interrupted() async throws {
            let store = try await store()
            defer { removeAll(store) }
            let tally = Reliability.Tally("SIGINT/SIGTERM/SIGHUP during create and clone")
            let own = try TemporaryStore("intr")
            defer { own.remove() }
            for signal in [SIGINT, SIGTERM, SIGHUP] {
                // create: interrupted while the guest boots.
                let create = try CLI.start(["create", "interrupted", "--recipe", Checkout.busyboxRecipe] + own.arguments)
                _ = await eventually(timeout: .seconds(10)) { !QEMUProcesses.using(own.root).isEmpty }
                kill(create.process.processIdentifier, signal)
                create.process.waitUntilExit()
                let created = create.result()
                let quiet = await eventually(timeout: .seconds(5)) { QEMUProcesses.using(own.root).isEmpty }
                tally.trial(failed: created.status != 128 + signal || !created.stderr.contains("interrupted"),
                            lost: !quiet || !own.stagingEntries().isEmpty || FileManager.default.fileExists(atPath: own.templateDirectory("interrupted")),
                            note: "create, signal \(signal): status \(created.status), staging \(own.stagingEntries()) \(created.stderr)")
                // clone: interrupted while QEMU starts (a QEMU that waits 2 s before it runs).
                let wrapper = try QEMUWrapper(body: "sleep 2; exec qemu-system-x86_64 \"$@\"")
                defer { wrapper.remove() }
                let before = cloneEntries(store)
                let clone = try CLI.start(["clone", SharedTemplate.name, "--qemu", wrapper.path] + store.arguments)
                try await Task.sleep(for: .milliseconds(500))
                kill(clone.process.processIdentifier, signal)
                clone.process.waitUntilExit()
                let cloned = clone.result()
                let cloneQuiet = await eventually(timeout: .seconds(5)) { QEMUProcesses.using(store.root).isEmpty }
                tally.trial(failed: cloned.status != 128 + signal, lost: !cloneQuiet || cloneEntries(store) != before,
                            note: "clone, signal \(signal): status \(cloned.status) \(cloned.stderr)")
            }
            tally.finish()
        }

        // MARK: QEMU killed or stopped under vmtemplate's feet

        @Test("SIGKILL and SIGSTOP of a clone's QEMU: list, rm and the scheduler keep working and say what happened")
        func qemuKilledAndStopped() async throws {
            let store = try await store()
            defer { removeAll(store) }
            let tally = Reliability.Tally("SIGKILL and SIGSTOP of a clone's QEMU")
            for _ in 0..<Reliability.trials(fast: 1, long: 5) {
                let killed = try CLI.run(["clone", SharedTemplate.name, "--name", "killed", "--json"] + store.arguments)
                let stopped = try CLI.run(["clone", SharedTemplate.name, "--name", "stopped", "--json"] + store.arguments)
                try #require(killed.status == 0 && stopped.status == 0)
                let killedPID = try #require(try TemplateStore(root: store.root).findClone("killed").qemu?.pid)
                let stoppedPID = try #require(try TemplateStore(root: store.root).findClone("stopped").qemu?.pid)
                kill(killedPID, SIGKILL)
                kill(stoppedPID, SIGSTOP)
                _ = await eventually(timeout: .seconds(5)) { ProcessStat.read(pid: killedPID).map { $0.state == "Z" } ?? true }
                let started = ContinuousClock.now
                let list = try CLI.run(["list", "--json"] + store.arguments)
                let listSeconds = started.duration(to: .now)
                let scheduler = try CLI.run(["scheduler", "--once"] + store.arguments)
                let states = list.stdout
                tally.trial(failed: list.status != 0 || !states.contains("\"exited\"") || !states.contains("\"unresponsive\"") || listSeconds > .seconds(10) || scheduler.status != 0,
                            lost: false, note: "list: \(list.stdout) \(list.stderr) scheduler: \(scheduler.stderr)")
                let removed = try CLI.run(["rm", "killed", "stopped", "--grace", "1"] + store.arguments)
                tally.trial(failed: removed.status != 0 || !removed.stdout.contains("already-exited") || !removed.stdout.contains("killed"),
                            lost: !(await eventually(timeout: .seconds(5)) { QEMUProcesses.using(store.root).isEmpty }), note: "rm: \(removed.stdout) \(removed.stderr)")
            }
            tally.finish()
        }

        // MARK: Damaged templates, records and settings

        @Test("a flipped byte, a truncation, a mode change, corrupt manifests, records and settings: refused with a sentence, nothing lost")
        func damaged() async throws {
            let tally = Reliability.Tally("damaged template files, manifests, records, settings")
            let own = try TemporaryStore("damage")
            defer { own.remove() }
            let created = try CLI.run(["create", "t", "--recipe", Checkout.busyboxRecipe] + own.arguments)
            try #require(created.status == 0, "\(created.stderr)")
            let directory = own.templateDirectory("t")
            chmod(directory, 0o755)
            let state = "\(directory)/state"
            let stateBytes = try Data(contentsOf: URL(fileURLWithPath: state))
            var original = stat()
            stat(state, &original)
            // Back as it was, in place (same inode) and with its old times, so the quick check passes.
            func restoreState() throws {
                chmod(state, 0o644)
                let handle = try #require(FileHandle(forUpdatingAtPath: state))
                try handle.truncate(atOffset: 0)
                handle.write(stateBytes)
                try handle.close()
                chmod(state, 0o444)
                var times = [original.st_atim, original.st_mtim]
                utimensat(AT_FDCWD, state, &times, 0)
            }
            // A flipped byte in place: same size, mode and inode, so only verify can tell.
            chmod(state, 0o644)
            let handle = try #require(FileHandle(forUpdatingAtPath: state))
            try handle.seek(toOffset: 100)
            let byte = try #require(try handle.read(upToCount: 1)?.first)
            try handle.seek(toOffset: 100)
            handle.write(Data([byte ^ 0xff]))
            try handle.close()
            chmod(state, 0o444)
            let verify = try CLI.run(["verify", "t", "--json"] + own.arguments)
            tally.trial(failed: verify.status == 0 || !verify.stdout.contains("\"ok\":false") || !verify.stderr.contains("(state)"), lost: false, note: "verify: \(verify.stdout) \(verify.stderr)")
            try restoreState()
            // Truncation and a mode change: clone's quick check refuses.
            for damage in ["truncate", "mode"] {
                chmod(state, 0o644)
                if damage == "truncate" { truncate(state, 1000) }
                if damage != "mode" { chmod(state, 0o444) }
                let result = try CLI.run(["clone", "t"] + own.arguments)
                tally.trial(failed: result.status == 0 || !result.stderr.contains("does not match its manifest"), lost: !QEMUProcesses.using(own.root).isEmpty, note: "\(damage): \(result.stderr)")
                try restoreState()
            }
            // A corrupt manifest.
            let manifest = "\(directory)/manifest.json"
            let manifestBytes = try Data(contentsOf: URL(fileURLWithPath: manifest))
            chmod(manifest, 0o644)
            try Data("{\"format_version\": 1, \"name\": 7}".utf8).write(to: URL(fileURLWithPath: manifest))
            for arguments in [["clone", "t"], ["verify", "t"], ["inspect", "t"]] {
                let result = try CLI.run(arguments + own.arguments)
                tally.trial(failed: result.status == 0 || result.signaled || !result.stderr.contains("manifest of template 't' cannot be read ('name' must be a string)"), lost: false, note: "\(arguments): \(result.stderr)")
            }
            try manifestBytes.write(to: URL(fileURLWithPath: manifest))
            chmod(manifest, 0o444)
            // A corrupt settings file: an error everywhere, the scheduler included.
            try Data("{\"max_clones\": -5}".utf8).write(to: URL(fileURLWithPath: "\(own.root)/settings.json"))
            for arguments in [["clone", "t"], ["settings"], ["scheduler", "--once"]] {
                let result = try CLI.run(arguments + own.arguments)
                tally.trial(failed: result.status == 0 || !result.stderr.contains("settings file"), lost: false, note: "\(arguments): \(result.stderr)")
            }
            unlink("\(own.root)/settings.json")
            // A corrupt record of a running clone: gc stops its QEMU by name and removes it.
            let clone = try CLI.run(["clone", "t", "--json"] + own.arguments)
            try #require(clone.status == 0, "\(clone.stderr)")
            let id = try #require(TemplateStore(root: own.root).clones().records.first?.id)
            try Data("garbage".utf8).write(to: URL(fileURLWithPath: "\(own.cloneDirectory(id))/record.json"))
            let gc = try CLI.run(["gc"] + own.arguments)
            let quiet = await eventually(timeout: .seconds(5)) { QEMUProcesses.using(own.root).isEmpty }
            tally.trial(failed: gc.status != 0, lost: !quiet || FileManager.default.fileExists(atPath: own.cloneDirectory(id)), note: "gc: \(gc.stdout) \(gc.stderr)")
            tally.finish()
        }

        // MARK: Generated bad input

        @Test("generated bad input (names, sizes, explain strings, recipes, records with every field wrong): a one-line error, never a crash")
        func generatedBadInput() async throws {
            let store = try await store()
            defer { removeAll(store) }
            let tally = Reliability.Tally("generated bad input")
            var generator = SystemRandomNumberGenerator()
            let alphabet = Array("abc-._/\\ \t\n;$`'\"\u{1b}[]{}%*?~:=,0123456789") + ["é", "😀"]
            func junk(_ length: Int) -> String { String((0..<length).map { _ in alphabet.randomElement(using: &generator) ?? "x" }) }
            let names = ["", "-rf", "..", ".hidden", String(repeating: "n", count: 65), "a/b", "\u{1b}[2J"] + (0..<Reliability.trials(fast: 10, long: 200)).map { _ in junk(Int.random(in: 1...20)) }
            for name in names {
                for arguments in [["clone", SharedTemplate.name, "--name", name], ["clone", name], ["rm", name], ["send", name, "ping"], ["inspect", name], ["verify", name], ["create", name, "--recipe", "/nonexistent"]] {
                    let result = try CLI.run(arguments + store.arguments)
                    let lines = result.stderr.split(separator: "\n").filter { !$0.hasPrefix("  ") && !$0.hasPrefix("Usage") && !$0.hasPrefix("  See") && !$0.isEmpty }
                    if result.status == 0 { _ = try? CLI.run(["rm", "--all"] + store.arguments); continue }
                    tally.trial(failed: result.signaled || result.stderr.contains("\u{1b}") || lines.isEmpty,
                                lost: !FileManager.default.fileExists(atPath: "\(store.templateDirectory(SharedTemplate.name))/memory"),
                                note: "\(arguments.map { TerminalText.escape($0) }): \(TerminalText.escape(result.stderr))")
                }
            }
            for size in ["", "-1", "1Q", "99999999999999999999G", "0", "1.5.5M", junk(6)] {
                let result = try CLI.run(["clone", SharedTemplate.name, "--cow-limit", size] + store.arguments)
                // Generated junk is now and then a valid size ("918007", seen once): then a clone is right.
                let valid = size == "0" || (try? ByteSize(parsing: size)) != nil
                tally.trial(failed: result.signaled || result.status == 0 && !valid, lost: false, note: "size \(size): \(result.stderr)")
                if result.status == 0 { _ = try? CLI.run(["rm", "--all"] + store.arguments) }
            }
            for text in ["", "share", "share=on,share=on", junk(30), String(repeating: "share=on,", count: 1000)] {
                let result = try CLI.run(["explain", text])
                tally.trial(failed: result.signaled || result.status == 0, lost: false, note: "explain \(text.prefix(40)): \(result.stderr)")
            }
            for recipe in ["{", "[]", "{\"kernel\": 5}", "{\"kernel\": \"/nonexistent\", \"append\": \"\"}", "{\"kernel\": \"/etc/hostname\", \"append\": \"\", \"memory\": \"-5M\"}", "{\"kernel\": \"/etc/hostname\", \"append\": \"\", \"cpus\": 100000}"] {
                let path = "/tmp/vmt-recipe-\(UUID().uuidString.prefix(8)).json"
                try Data(recipe.utf8).write(to: URL(fileURLWithPath: path))
                defer { unlink(path) }
                let result = try CLI.run(["create", "fuzzed", "--recipe", path] + store.arguments)
                tally.trial(failed: result.signaled || result.status == 0, lost: !store.stagingEntries().isEmpty, note: "recipe \(recipe): \(result.stderr)")
            }
            // Records with every field wrong, each in turn: listed as a problem, never a crash.
            let fields = ["id": "5", "name": "[]", "template": "\"../x\"", "qemu": "{\"pid\": -1, \"startTime\": -1}", "created_at": "\"yesterday\"", "state": "7",
                          "memory_file": "\"/etc/passwd\"", "writable_template": "\"no\"", "qemu_arguments": "{}", "guest_memory_bytes": "-1", "cow_limit_bytes": "1e400", "restore_seconds": "\"fast\""]
            for (field, value) in fields {
                try Reliability.plant(Reliability.recordJSON(id: "999999999999", name: "broken", pid: 1, startTime: 0, store: store, overrides: [field: value]), id: "999999999999", in: store)
                for arguments in [["list"], ["list", "--json"], ["clone", SharedTemplate.name, "--name", "probe"], ["scheduler", "--once"], ["rm", "broken"]] {
                    let result = try CLI.run(arguments + store.arguments)
                    tally.trial(failed: result.signaled, lost: false, note: "record with bad \(field), \(arguments): \(result.stderr)")
                }
                _ = try? CLI.run(["rm", "probe"] + store.arguments)
                try? FileManager.default.removeItem(atPath: store.cloneDirectory("999999999999"))
            }
            tally.finish()
        }

        // MARK: Clear refusals

        @Test("clear refusals: kvm that cannot run guests, send to a paused clone, another user's clone, read-only commands on a missing store")
        func clearRefusals() async throws {
            let store = try await store()
            defer { removeAll(store) }
            let tally = Reliability.Tally("clear refusals")
            if !KVMProbe.probe().usableForStockGuests {
                let own = try TemporaryStore("kvm")
                defer { own.remove() }
                let started = ContinuousClock.now
                let kvm = try CLI.run(["create", "k", "--recipe", Checkout.busyboxRecipe, "--accel", "kvm"] + own.arguments)
                tally.trial(failed: kvm.status == 0 || !kvm.stderr.contains("cannot run ordinary guests") || started.duration(to: .now) > .seconds(10), lost: !QEMUProcesses.using(own.root).isEmpty, note: "create --accel kvm: \(kvm.stderr)")
            }
            let clone = try CLI.run(["clone", SharedTemplate.name, "--name", "frozen", "--json"] + store.arguments)
            try #require(clone.status == 0, "\(clone.stderr)")
            let qmp = try await QMPClient.connect(socketPath: TemplateStore(root: store.root).clonePaths(try TemplateStore(root: store.root).findClone("frozen").id).qmpSocket, timeout: .seconds(5))
            try await qmp.stop()
            qmp.close()
            // Names are unique among clones and templates.
            let sameName = try CLI.run(["create", "frozen", "--recipe", Checkout.busyboxRecipe] + store.arguments)
            tally.trial(failed: sameName.status == 0 || !sameName.stderr.contains("is the name of a clone"), lost: !store.stagingEntries().isEmpty, note: "create with a clone's name: \(sameName.stderr)")
            let started = ContinuousClock.now
            let send = try CLI.run(["send", "frozen", "ping", "--timeout", "30"] + store.arguments)
            tally.trial(failed: send.status == 0 || !send.stderr.contains("is paused") || started.duration(to: .now) > .seconds(10), lost: false, note: "send to a paused clone: \(send.stderr)")
            if Environment.isRoot {
                let listing = try Reliability.asNobody([Checkout.binary, "list", "--json"] + store.arguments)
                tally.trial(failed: listing.status != 0 || !listing.stdout.contains("\"state\":\"not-yours\"") || listing.stdout.contains("\"state\":\"unresponsive\""), lost: false, note: "list as nobody: \(listing.stdout) \(listing.stderr)")
            }
            let missing = "/tmp/vmt-missing-\(UUID().uuidString.prefix(8))"
            for arguments in [["list"], ["settings"], ["inspect", "x"], ["verify", "x"], ["send", "x", "ping"]] {
                let result = try CLI.run(arguments + ["--store", missing])
                tally.trial(failed: result.signaled, lost: FileManager.default.fileExists(atPath: missing), note: "\(arguments) created \(missing)")
            }
            tally.finish()
        }

        // MARK: A full disk

        @Test("clone into a store on a small, full tmpfs: a clear error, nothing half-made, no QEMU", .enabled(if: Environment.isRoot, "needs root to mount a tmpfs"))
        func fullStore() async throws {
            let templates = try await store()
            let tally = Reliability.Tally("clone into a full store")
            let tmpfs = try TmpfsStore("fullc", size: "1M")
            defer { tmpfs.unmount() }
            let mountPoint = tmpfs.store
            #expect(try CLI.run(["settings"] + mountPoint.arguments).status == 0)
            #expect(try CLI.run(["settings", "--max-clones", "100"] + mountPoint.arguments).status == 0)
            let free = try FileSystem.availableBytes(onFileSystemOf: mountPoint.root)
            try FileSystem.allocateFile(path: "\(mountPoint.root)/filler", size: free, mode: 0o600)
            for _ in 0..<Reliability.trials(fast: 2, long: 10) {
                let result = try CLI.run(["clone", SharedTemplate.name, "--template-store", templates.root] + mountPoint.arguments)
                let left = (try? FileManager.default.contentsOfDirectory(atPath: "\(mountPoint.root)/clones")) ?? []
                let quiet = await eventually(timeout: .seconds(5)) { QEMUProcesses.using(mountPoint.root).isEmpty }
                tally.trial(failed: result.status == 0 || result.signaled || !(result.stderr.contains("full") || result.stderr.contains("No space left")),
                            lost: !left.isEmpty || !quiet, note: "status \(result.status): \(result.stderr), left \(left)")
            }
            tally.finish()
        }

        // MARK: Many at once

        @Test("concurrent clones interleaved with list, rm, gc and the scheduler: every clone accounted for, no orphan QEMU")
        func concurrency() async throws {
            let store = try await store()
            defer { removeAll(store) }
            let tally = Reliability.Tally("concurrent clone, list, rm, gc, scheduler")
            let count = Reliability.trials(fast: 8, long: 32)
            for round in 0..<Reliability.trials(fast: 1, long: 3) {
                var clones: [CLI.Running] = []
                var others: [CLI.Running] = []
                for index in 0..<count {
                    clones.append(try CLI.start(["clone", SharedTemplate.name, "--name", "r\(round)-\(index)", "--timeout", "180"] + store.arguments))
                    if index % 4 == 0 {
                        others.append(try CLI.start(["list", "--json"] + store.arguments))
                        others.append(try CLI.start(["gc"] + store.arguments))
                    }
                    // One scheduler round per batch: a second one at the same time is refused by
                    // design ("run only one per store"), which is no failure of the clones'.
                    if index == count / 2 {
                        others.append(try CLI.start(["scheduler", "--once"] + store.arguments))
                    }
                }
                let results = clones.map { running -> CommandResult in
                    running.process.waitUntilExit()
                    return running.result()
                }
                let otherResults = others.map { running -> CommandResult in
                    running.process.waitUntilExit()
                    return running.result()
                }
                let listing = try TemplateStore(root: store.root).clones().records
                let made = results.filter { $0.status == 0 }.count
                let running = listing.filter { $0.qemu?.isAlive == true }.count
                tally.trial(failed: made != count || otherResults.contains { $0.status != 0 || $0.signaled },
                            lost: listing.count != made || running != made,
                            note: "made \(made)/\(count), records \(listing.count), running \(running), errors \(results.map(\.stderr).filter { !$0.isEmpty }) \(otherResults.map(\.stderr).filter { !$0.isEmpty })")
                let removed = try CLI.run(["rm", "--all", "--grace", "1"] + store.arguments)
                let quiet = await eventually(timeout: .seconds(10)) { QEMUProcesses.using(store.root).isEmpty }
                tally.trial(failed: removed.status != 0, lost: !quiet || !cloneEntries(store).isEmpty, note: "rm --all: \(removed.stderr)")
            }
            tally.finish()
        }
    }
}
