import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension WarmPool {
    /// Hands out a ready member of `template`'s warm pool, or returns nil when there is none.
    ///
    /// The member is claimed by renaming its ready file (one winner among concurrent callers);
    /// its record must then say `pooled`, this template, and name a QEMU that is this clone's own
    /// and alive, or the member is removed and the next one tried: a member that died while pooled
    /// is never handed out. The record is rewritten to `starting` with this process as creator
    /// before anything else is done, so a caller killed from then on leaves a clone `gc` treats as
    /// an interrupted one; one killed before that leaves the member pooled (``WarmPool/repair()``).
    /// Then the clone gets its name, devices, `cont`, and its clock and hostname, as a fresh one.
    func handOut(_ request: CloneRequest, template: PublishedTemplate, started: ContinuousClock.Instant) async throws -> CloneRecord? {
        let name = request.template
        for id in store.pools.readyMembers(of: name) {
            guard store.pools.claim(id, template: name) else { continue }
            defer { store.pools.releaseClaim(id, template: name) }
            // A ready file is only a hint: the record says whether this is a member of this pool.
            guard let member = store.cloneRecord(id), member.state == .pooled, member.template == name.value, member.templateStore == nil else { continue }
            // A member of an earlier template of this name (removed, then made again) maps that
            // template's RAM: never handed out, removed.
            guard member.templateDigest == template.manifest.identity, case .running(let qemu) = lifecycle.qemu(of: member) else {
                // A member whose QEMU died while pooled: removed, never handed out.
                _ = try? await lifecycle.remove(member, grace: .milliseconds(200))
                continue
            }
            var lap = Lap(from: started)
            var timings = CloneTimings()
            var record = member
            record.state = .starting
            record.creator = ProcessIdentity.current(pid: getpid())
            record.createdAt = Date()
            record.cowLimitBytes = request.cowLimitBytes
            record.overLimitAction = request.overLimitAction
            record.fromPool = true
            record.requestedBy = request.requestedBy
            do {
                if let wanted = request.name?.value, wanted != id {
                    // Names are unique among clones and templates: checked and taken under the
                    // store lock. Without a name (the ID is the name) the claim alone suffices.
                    let named = try await store.withLock { locked in
                        try launcher.refuseTemplateName(wanted)
                        var named = record
                        named.name = wanted
                        try locked.claimNames(of: named)
                        try store.save(named)
                        locked.record(StoreEvent(.cloneCreated, of: named))
                        return named
                    }
                    record = named
                } else {
                    let handedOut = record
                    try await store.withLock { locked in
                        try store.save(handedOut)
                        locked.record(StoreEvent(.cloneCreated, of: handedOut))
                    }
                }
            } catch {
                // Nothing was changed: the member goes back to its pool.
                try? store.pools.markReady(id, template: name)
                throw error
            }
            timings.admission = lap.next()
            do {
                let devices = try CloneDevices.open(request.devices, cloneID: id, cloneDirectory: store.cloneDirectory(id), existing: [], slots: record.hotplugSlots ?? 0)
                defer { for device in devices { device.closeDescriptors() } }
                let opened = lap.next()
                // Without devices, `cont` goes out with the handshake: no round trip of its own.
                let qmp = try await qemu.connectQMP(timeout: request.timeout, pipelining: devices.isEmpty ? [QMPCommand("cont")] : [], phase: "the hand-out of pool member \(id)")
                defer { qmp.close() }
                var attached: [AttachedDevice] = []
                let connected = lap.next()
                for device in devices {
                    attached.append(try await qmp.attach(device, timeout: request.timeout))
                }
                record.devices = attached.isEmpty ? nil : attached
                record.devicesReady = attached.isEmpty ? nil : false
                timings.devices = opened + lap.next()
                if !devices.isEmpty { try await qmp.cont() }
                GuestSetup.begin(&record, template: template.manifest, store: store, request: request)
                // Without devices, `cont` went out with the QMP handshake.
                timings.resume = connected + lap.next()
                record.state = .running
                record.restoreSeconds = started.duration(to: .now).seconds
                try await store.saveTimed(&record, timings: timings, lap: &lap, started: started)
                return record
            } catch {
                // Half handed out: removed like a fresh clone that failed.
                let failed = record
                await uncancellable { _ = try? await lifecycle.remove(failed, grace: .milliseconds(200)) }
                throw error
            }
        }
        return nil
    }

    /// Warms a pool member that has just been resumed: its guest answers its clock and hostname
    /// requests and a `ping` (so the code a resumed guest runs for them is translated now, not
    /// when a runtime asks), then it is paused again. A member whose guest does not answer within
    /// `timeout` fails, and is removed like any clone that failed to start.
    func warm(_ record: CloneRecord, qmp: QMPClient, manifest: TemplateManifest, timeout: Duration) async throws {
        if manifest.machine.guestAgent && manifest.guestClock != .controlChannel {
            // A guest of its own: warmed by its agent, which runs the per-clone steps once now
            // (with the member's ID as its name): under TCG the code they run is then translated,
            // and the hand-out's own run of them (which renews the identity again) is quicker.
            let socket = store.clonePaths(record.id).agentSocket
            let deadline = ContinuousClock.now + timeout
            let rehearsal = manifest.guestClock == .guestAgent ? GuestAgentSetup(cloneID: record.id, hostname: record.id, commands: manifest.guestCommands ?? []) : nil
            try await onOwnThread {
                let agent = try GuestAgentConnection.connect(path: socket)
                defer { agent.close() }
                try agent.synchronize(until: deadline)
                try agent.execute("guest-ping", until: deadline)
                if let rehearsal {
                    var failures: [String] = []
                    guard rehearsal.run(on: agent, log: { if $0.contains(": failed: ") { failures.append($0) } }), failures.isEmpty else {
                        throw VMTemplateError(.qemuFailed, "pool member \(record.id)'s per-clone steps failed while warming: \(failures.first ?? "no answer"); fix the template's guest_commands.")
                    }
                }
            }
            try await qmp.stop()
            return
        }
        let channel = ControlChannel(path: store.clonePaths(record.id).controlSocket)
        var requests = ["ping"]
        if manifest.guestClock == .controlChannel {
            requests = ["settime \(Int(Date().timeIntervalSince1970.rounded()))", "hostname \(record.id)", "ping"]
        }
        let lines = requests
        let replies = try await onOwnThread { try channel.requests(lines, timeout: timeout) }
        guard replies.last == "pong" else {
            throw VMTemplateError(.qemuFailed, "pool member \(record.id) answered '\(TerminalText.escape(replies.last ?? ""))' to ping while warming: its guest does not speak the control protocol; this template cannot be pooled.")
        }
        try await qmp.stop()
    }
}

/// Runs blocking work (waiting for a guest, a child process) on a thread of its own: Swift's
/// cooperative pool has one thread per core, two here, and blocking them would serialize
/// everything else. A 1 MiB stack: the work is shallow, and many may wait at once.
public func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            continuation.resume(with: Result { try body() })
        }
        thread.stackSize = 1 << 20
        thread.start()
    }
}
