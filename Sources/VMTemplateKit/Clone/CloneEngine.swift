import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// `clone`'s front door: a ready member of the template's warm pool if there is one
/// (``WarmPool/handOut(_:template:started:)``), else a fresh clone (``CloneLauncher``), resumed
/// and told its clock and hostname.
public struct CloneEngine: Sendable {
    public let launcher: CloneLauncher

    public init(store: TemplateStore, templates: TemplateStore? = nil, explicitQEMU: String? = nil) {
        launcher = CloneLauncher(store: store, templates: templates, explicitQEMU: explicitQEMU)
    }

    public var store: TemplateStore { launcher.store }
    public var pool: WarmPool { WarmPool(launcher: launcher) }

    /// Starts a clone and returns once its guest runs; `created` is false when the request was a
    /// retry of one that had succeeded (``retried(_:template:)``): the clone it made is returned.
    /// With ``CloneRequest/waitForDevices``, it returns once the guest also sees its devices, or
    /// the request's timeout has passed: the clone was made either way, and its `devicesReady`
    /// says which (false: not seen yet; the warning says so).
    public func clone(_ request: CloneRequest) async throws -> (record: CloneRecord, warning: String?, created: Bool) {
        var result = try await start(request)
        guard request.waitForDevices, result.record.devicesReady == false else { return result }
        do {
            result.record = try await DeviceReadiness(store: store).wait(for: result.record, timeout: request.timeout)
        } catch let error as VMTemplateError where error.code == .timeout {
            result.warning = [result.warning, "clone \(result.record.id) runs, but \(error.message) It was kept; its devices_ready stays false until its guest sees them."].compactMap { $0 }.joined(separator: "\n")
        }
        return result
    }

    private func start(_ request: CloneRequest) async throws -> (record: CloneRecord, warning: String?, created: Bool) {
        let started = ContinuousClock.now
        try request.validate()
        let template = try launcher.template(request.template)
        // Judged before anything else, the store's limits included: a retry must terminate.
        if let existing = try retried(request, template: template) {
            return (existing, nil, false)
        }
        // A guest agent's steps need a process that outlives the CLI: started now, so that its
        // start-up overlaps the restore (when this process only waits for QEMU), not the resumed
        // guest's first moments. Closing the channel without handing it anything ends it.
        var request = request
        var helperChannel: Int32 = -1
        if template.manifest.guestClock == .guestAgent, request.guestRepliesInChild, let executable = request.guestSetupHelper {
            helperChannel = (try? GuestAgentSetup.startHelper(executable: executable, store: store)) ?? -1
            request.guestSetupChannel = helperChannel >= 0 ? helperChannel : nil
        }
        defer { if helperChannel >= 0 { close(helperChannel) } }
        // A pool belongs to a store's own templates.
        if request.usePool, launcher.templates.root == store.root,
           let record = try await pool.handOut(request, template: template, started: started) {
            return (record, nil, true)
        }
        var launched = try await launcher.launch(request, from: template, state: .starting, started: started)
        do {
            defer { launched.qmp.close() }
            try await launched.qmp.cont()
            GuestSetup.begin(&launched.record, template: template.manifest, store: store, request: request)
            launched.timings.resume = launched.lap.next()
            launched.record.state = .running
            launched.record.restoreSeconds = started.duration(to: .now).seconds
            try await store.saveTimed(&launched.record, timings: launched.timings, lap: &launched.lap, started: started)
            return (launched.record, launched.warning, true)
        } catch {
            await launcher.discard(launched)
            throw error
        }
    }

    /// A create retried after it succeeded (a runtime that lost the answer, or timed out waiting
    /// for it): the clone named so when it is what this request asks for (the same template, the
    /// same copy-on-write limit, as many NICs and disks, running), nil when the name is free; a
    /// clone that differs is `exists`, naming the difference.
    func retried(_ request: CloneRequest, template: PublishedTemplate) throws -> CloneRecord? {
        guard let name = request.name?.value, let record = store.cloneHoldingName(name) else { return nil }
        var differences: [String] = []
        if record.name != name { differences.append("ID (it is clone \(record.id)'s)") }
        if record.template != template.manifest.name || record.templateDigest != template.manifest.identity { differences.append("template ('\(record.template)', as it was then)") }
        if record.cowLimitBytes != request.cowLimitBytes { differences.append("copy-on-write limit") }
        let devices = record.devices ?? []
        if devices.count(where: { $0.kind == .nic }) != request.devices.nics.count || devices.count(where: { $0.kind == .disk }) != request.devices.disks.count {
            differences.append("set of devices")
        }
        if !record.isLive || record.isBeingSetUp { differences.append("state (\(record.isLive ? record.state.rawValue : "exited"))") }
        guard differences.isEmpty else {
            throw VMTemplateError(.exists, "a clone named '\(name)' already exists with another \(differences.joined(separator: ", ")): remove it (vmtemplate rm \(name)) or pick another --name.")
        }
        return record
    }
}
