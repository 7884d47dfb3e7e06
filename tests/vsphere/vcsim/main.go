// Command vcsim serves govmomi's vCenter simulator (simulator.VPX) on loopback for the vSphere
// fabric's tests. Beyond the stock model it adds what those tests need and stock vcsim does not do:
// a table of users with vSphere roles whose privileges are enforced (login, HasPrivilegeOnEntities,
// FetchUserPrivilegeOnEntities, datastores hidden from accounts without Datastore.Browse, task
// methods refused with NoPermission, on a snapshot checked against its machine), the new role's id
// from AddAuthorizationRole, licence assignment per host (LicenseAssignmentManager), disk UUIDs,
// the model's shared datastores typed VMFS and mounted on every host, NFS datastores mounted with
// the access mode their spec asks for, and tasks on snapshots reported against their machine. It
// prints one JSON line describing the endpoint and serves until it is killed.
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"encoding/xml"
	"flag"
	"fmt"
	"html"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// user is one account of the simulated vCenter and the role it holds on the root folder.
type user struct {
	Password string `json:"password"`
	Role     string `json:"role"`
}

// Licence keys the simulated vCenter knows, by edition, in the shape of real vSphere keys.
var catalogue = map[string]types.LicenseManagerLicenseInfo{
	"M0000-FREE0-00000-00000-00000": {LicenseKey: "M0000-FREE0-00000-00000-00000", EditionKey: "esxBasic",
		Name: "VMware vSphere 6 Hypervisor"},
	"M0000-STD00-00000-00000-00000": {LicenseKey: "M0000-STD00-00000-00000-00000", EditionKey: "esxStandard",
		Name: "VMware vSphere 6 Standard"},
	"M0000-ENTPL-00000-00000-00000": {LicenseKey: "M0000-ENTPL-00000-00000-00000", EditionKey: "esxEnterprisePlus",
		Name: "VMware vSphere 6 Enterprise Plus"},
	simulator.EvalLicense.LicenseKey: simulator.EvalLicense,
}

// Privilege each refused-if-missing method needs (vSphere's own names).
var methodPrivilege = map[string]string{
	"PowerOnVM_Task":           "VirtualMachine.Interact.PowerOn",
	"PowerOffVM_Task":          "VirtualMachine.Interact.PowerOff",
	"CreateVM_Task":            "VirtualMachine.Inventory.Create",
	"Destroy_Task":             "VirtualMachine.Inventory.Delete",
	"ReconfigVM_Task":          "VirtualMachine.Config.Settings",
	"CreateSnapshot_Task":      "VirtualMachine.State.CreateSnapshot",
	"RevertToSnapshot_Task":    "VirtualMachine.State.RevertToSnapshot",
	"RemoveSnapshot_Task":      "VirtualMachine.State.RemoveSnapshot",
	"RemoveAllSnapshots_Task":  "VirtualMachine.State.RemoveSnapshot",
	"RelocateVM_Task":          "Resource.ColdMigrate",
	"UpdateAssignedLicense":    "Global.Licenses",
	"CreateNasDatastore":       "Host.Config.Storage",
	"SetEntityPermissions":     "Authorization.ModifyPermissions",
	"DeleteDatastoreFile_Task": "Datastore.FileManagement",
}

var (
	users     map[string]user
	authz     *authorization
	sessionMu sync.Mutex
	sessions  = map[string]string{} // session cookie -> user name
)

// authorization answers privilege queries from the permissions actually granted, where stock vcsim
// grants everything to everyone.
type authorization struct {
	*simulator.AuthorizationManager
}

func (a *authorization) privileges(userName string, entity types.ManagedObjectReference) map[string]bool {
	out := map[string]bool{}
	// A snapshot is no inventory entity: like vCenter, check the privilege on its machine.
	if snapshot, ok := simulator.Map.Get(entity).(*simulator.VirtualMachineSnapshot); ok {
		entity = snapshot.Vm
	}
	if _, ok := simulator.Map.Get(entity).(mo.Entity); !ok {
		entity = rootFolder()
	}
	res := a.RetrieveEntityPermissions(&types.RetrieveEntityPermissions{Entity: entity, Inherited: true})
	perms := res.(*methods.RetrieveEntityPermissionsBody).Res.Returnval
	roles := object.AuthorizationRoleList(a.RoleList)
	for _, p := range perms {
		if p.Group || p.Principal != userName {
			continue
		}
		if role := roles.ById(p.RoleId); role != nil {
			for _, id := range role.Privilege {
				out[id] = true
			}
		}
	}
	return out
}

func serviceContent() types.ServiceContent {
	ref := types.ManagedObjectReference{Type: "ServiceInstance", Value: "ServiceInstance"}
	return simulator.Map.Get(ref).(*simulator.ServiceInstance).Content
}

func rootFolder() types.ManagedObjectReference { return serviceContent().RootFolder }

func (a *authorization) HasPrivilegeOnEntities(ctx *simulator.Context, req *types.HasPrivilegeOnEntities) soap.HasFault {
	return &methods.HasPrivilegeOnEntitiesBody{Res: &types.HasPrivilegeOnEntitiesResponse{
		Returnval: a.entityPrivileges(ctx.Session.UserName, req.Entity, req.PrivId)}}
}

func (a *authorization) HasUserPrivilegeOnEntities(req *types.HasUserPrivilegeOnEntities) soap.HasFault {
	return &methods.HasUserPrivilegeOnEntitiesBody{Res: &types.HasUserPrivilegeOnEntitiesResponse{
		Returnval: a.entityPrivileges(req.UserName, req.Entities, req.PrivId)}}
}

func (a *authorization) entityPrivileges(userName string, entities []types.ManagedObjectReference,
	ids []string) []types.EntityPrivilege {
	var out []types.EntityPrivilege
	for _, e := range entities {
		granted := a.privileges(userName, e)
		p := types.EntityPrivilege{Entity: e}
		for _, id := range ids {
			p.PrivAvailability = append(p.PrivAvailability, types.PrivilegeAvailability{PrivId: id, IsGranted: granted[id]})
		}
		out = append(out, p)
	}
	return out
}

// AddAuthorizationRole answers with the new role's id, as vCenter does (vcsim leaves it out).
func (a *authorization) AddAuthorizationRole(req *types.AddAuthorizationRole) soap.HasFault {
	res := a.AuthorizationManager.AddAuthorizationRole(req)
	if body := res.(*methods.AddAuthorizationRoleBody); body.Res != nil {
		body.Res.Returnval = object.AuthorizationRoleList(a.RoleList).ByName(req.Name).RoleId
	}
	return res
}

func (a *authorization) FetchUserPrivilegeOnEntities(req *types.FetchUserPrivilegeOnEntities) soap.HasFault {
	var out []types.UserPrivilegeResult
	for _, e := range req.Entities {
		r := types.UserPrivilegeResult{Entity: e}
		for id := range a.privileges(req.UserName, e) {
			r.Privileges = append(r.Privileges, id)
		}
		out = append(out, r)
	}
	return &methods.FetchUserPrivilegeOnEntitiesBody{Res: &types.FetchUserPrivilegeOnEntitiesResponse{Returnval: out}}
}

// propertyCollector hides datastores from sessions whose account lacks Datastore.Browse, as vCenter
// omits objects the account may not see. Embedded by value: vcsim clones it per session by type.
type propertyCollector struct {
	simulator.PropertyCollector
}

func visible(ctx *simulator.Context, objects []types.ObjectContent) []types.ObjectContent {
	if ctx.Session == nil {
		return objects
	}
	if authz.privileges(ctx.Session.UserName, rootFolder())["Datastore.Browse"] {
		return objects
	}
	var out []types.ObjectContent
	for _, o := range objects {
		if o.Obj.Type != "Datastore" {
			out = append(out, o)
		}
	}
	return out
}

// assignDiskUUIDs gives each virtual disk the UUID vSphere keeps in its descriptor (backing.uuid),
// which vcsim leaves empty. It is derived from the file name, so the same file attached to another
// machine keeps its UUID as a real disk does.
func assignDiskUUIDs() {
	for _, ref := range simulator.Map.All("VirtualMachine") {
		vm := simulator.Map.Get(ref.Reference()).(*simulator.VirtualMachine)
		simulator.Map.WithLock(vm, func() {
			if vm.Config == nil {
				return
			}
			for _, d := range vm.Config.Hardware.Device {
				disk, ok := d.(*types.VirtualDisk)
				if !ok {
					continue
				}
				if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && b.Uuid == "" {
					b.Uuid = uuid.NewSHA1(uuid.NameSpaceURL, []byte(b.FileName)).String()
				}
			}
		})
	}
}

func (pc *propertyCollector) RetrievePropertiesEx(ctx *simulator.Context, r *types.RetrievePropertiesEx) soap.HasFault {
	assignDiskUUIDs()
	res := pc.PropertyCollector.RetrievePropertiesEx(ctx, r)
	if body, ok := res.(*methods.RetrievePropertiesExBody); ok && body.Res != nil {
		body.Res.Returnval.Objects = visible(ctx, body.Res.Returnval.Objects)
	}
	return res
}

func (pc *propertyCollector) RetrieveProperties(ctx *simulator.Context, r *types.RetrieveProperties) soap.HasFault {
	assignDiskUUIDs()
	res := pc.PropertyCollector.RetrieveProperties(ctx, r)
	if body, ok := res.(*methods.RetrievePropertiesBody); ok && body.Res != nil {
		body.Res.Returnval = visible(ctx, body.Res.Returnval)
	}
	return res
}

// snapshotTasks reports each task on a snapshot (revert, remove) against the snapshot's machine, as
// vCenter does. vcsim names the snapshot itself, which is no ManagedEntity, and clients that check
// TaskInfo.entity's type (pyVmomi) then refuse to read the task. As a registry handler it sees each
// task when it is created, while its snapshot still exists.
type snapshotTasks struct{}

func (snapshotTasks) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "SnapshotTasks", Value: "snapshot-tasks"}
}

func (snapshotTasks) PutObject(obj mo.Reference) {
	task, ok := obj.(*simulator.Task)
	if !ok || task.Info.Entity == nil || task.Info.Entity.Type != "VirtualMachineSnapshot" {
		return
	}
	if snapshot, ok := simulator.Map.Get(*task.Info.Entity).(*simulator.VirtualMachineSnapshot); ok {
		vm := snapshot.Vm
		task.Info.Entity, task.Info.EntityName = &vm, vm.Value
	}
}

func (snapshotTasks) UpdateObject(mo.Reference, []types.PropertyChange) {}

func (snapshotTasks) RemoveObject(types.ManagedObjectReference) {}

// licenceAssignment keeps the licence assigned to each host, where stock vcsim reports evaluation
// mode for every entity whatever was assigned.
type licenceAssignment struct {
	*simulator.LicenseAssignmentManager
	assigned map[string]types.LicenseManagerLicenseInfo
}

func (l *licenceAssignment) UpdateAssignedLicense(req *types.UpdateAssignedLicense) soap.HasFault {
	body := &methods.UpdateAssignedLicenseBody{}
	info, ok := catalogue[req.LicenseKey]
	if !ok {
		body.Fault_ = simulator.Fault("license key is not valid", &types.InvalidLicense{LicenseContent: req.LicenseKey})
		return body
	}
	l.assigned[req.Entity] = info
	body.Res = &types.UpdateAssignedLicenseResponse{Returnval: info}
	return body
}

func (l *licenceAssignment) QueryAssignedLicenses(req *types.QueryAssignedLicenses) soap.HasFault {
	body := &methods.QueryAssignedLicensesBody{Res: &types.QueryAssignedLicensesResponse{}}
	var entities []string
	if req.EntityId != "" {
		entities = []string{req.EntityId}
	} else {
		// Like vCenter: no entity means every assignment, one per host.
		for _, ref := range simulator.Map.All("HostSystem") {
			entities = append(entities, ref.Reference().Value)
		}
	}
	for _, id := range entities {
		if simulator.Map.Get(types.ManagedObjectReference{Type: "HostSystem", Value: id}) == nil {
			continue
		}
		info, ok := l.assigned[id]
		if !ok {
			info = simulator.EvalLicense
		}
		body.Res.Returnval = append(body.Res.Returnval, types.LicenseAssignmentManagerLicenseAssignment{
			EntityId: id, AssignedLicense: info,
		})
	}
	return body
}

// datastoreSystem mounts a new NFS datastore on its host with the spec's access mode, where stock
// vcsim records no host mount at all.
type datastoreSystem struct {
	*simulator.HostDatastoreSystem
}

func (d *datastoreSystem) CreateNasDatastore(ctx *simulator.Context, c *types.CreateNasDatastore) soap.HasFault {
	res := d.HostDatastoreSystem.CreateNasDatastore(ctx, c)
	body := res.(*methods.CreateNasDatastoreBody)
	if body.Res == nil {
		return res
	}
	mode := c.Spec.AccessMode
	if mode == "" {
		mode = string(types.HostMountModeReadWrite)
	}
	ds := simulator.Map.Get(body.Res.Returnval).(*simulator.Datastore)
	simulator.Map.WithLock(ds, func() {
		ds.Host = append(ds.Host, types.DatastoreHostMount{
			Key: d.Host.Self,
			MountInfo: types.HostMountInfo{
				Path: c.Spec.LocalPath, AccessMode: mode,
				Mounted: types.NewBool(true), Accessible: types.NewBool(true),
			},
		})
	})
	return res
}

// soapRequest is the part of a SOAP request the gate needs: the method and its target.
type soapRequest struct {
	Method   string
	This     types.ManagedObjectReference
	UserName string
	Password string
}

func parseRequest(body []byte) soapRequest {
	var out soapRequest
	dec := xml.NewDecoder(bytes.NewReader(body))
	depth, field := 0, ""
	for {
		tok, err := dec.Token()
		if err != nil {
			return out
		}
		switch t := tok.(type) {
		case xml.StartElement:
			depth++
			switch {
			case depth == 3 && out.Method == "":
				out.Method = t.Name.Local
			case depth == 4:
				field = t.Name.Local
				if field == "_this" {
					for _, a := range t.Attr {
						if a.Name.Local == "type" {
							out.This.Type = a.Value
						}
					}
				}
			}
		case xml.CharData:
			if depth == 4 {
				switch field {
				case "_this":
					out.This.Value += string(t)
				case "userName":
					out.UserName += string(t)
				case "password":
					out.Password += string(t)
				}
			}
		case xml.EndElement:
			depth--
		}
	}
}

const faultEnvelope = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" ` +
	`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" ` +
	`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault>` +
	`<faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring><detail>%s</detail>` +
	`</soapenv:Fault></soapenv:Body></soapenv:Envelope>`

func writeFault(w http.ResponseWriter, message, detail string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, faultEnvelope, html.EscapeString(message), detail)
}

// gate checks logins against the user table and refuses methods whose privilege the session's
// account lacks, before vcsim (which accepts any login and grants everything) sees the request.
func gate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			next.ServeHTTP(w, r)
			return
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		req := parseRequest(body)
		if req.Method == "Login" {
			u, ok := users[req.UserName]
			if !ok || u.Password != req.Password {
				writeFault(w, "Cannot complete login due to an incorrect user name or password.",
					`<InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault>`)
				return
			}
			next.ServeHTTP(w, r)
			for _, c := range (&http.Response{Header: w.Header()}).Cookies() {
				if c.Name == soap.SessionCookieName {
					sessionMu.Lock()
					sessions[c.Value] = req.UserName
					sessionMu.Unlock()
				}
			}
			return
		}
		if priv, ok := methodPrivilege[req.Method]; ok {
			name := ""
			if c, err := r.Cookie(soap.SessionCookieName); err == nil {
				sessionMu.Lock()
				name = sessions[c.Value]
				sessionMu.Unlock()
			}
			if name != "" && !authz.privileges(name, req.This)[priv] {
				writeFault(w, "Permission to perform this operation was denied.", fmt.Sprintf(
					`<NoPermissionFault xmlns="urn:vim25" xsi:type="NoPermission">`+
						`<object type="%s">%s</object><privilegeId>%s</privilegeId></NoPermissionFault>`,
					html.EscapeString(req.This.Type), html.EscapeString(req.This.Value), priv))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// noVMFSHost names the host install() keeps off the model's shared VMFS datastore.
var noVMFSHost string

// install wraps vcsim's singletons with the types above and grants each user its role on the root.
func install() error {
	content := serviceContent()

	am := simulator.Map.Get(*content.AuthorizationManager).(*simulator.AuthorizationManager)
	authz = &authorization{am}
	simulator.Map.Put(authz)
	roles := object.AuthorizationRoleList(am.RoleList)
	root := content.RootFolder
	perms := am.RetrieveEntityPermissions(&types.RetrieveEntityPermissions{Entity: root}).(*methods.RetrieveEntityPermissionsBody).Res.Returnval
	for name, u := range users {
		role := roles.ByName(u.Role)
		if role == nil {
			return fmt.Errorf("user %s: unknown role %s", name, u.Role)
		}
		perms = append(perms, types.Permission{Entity: &root, Principal: name, RoleId: role.RoleId, Propagate: true})
	}
	am.SetEntityPermissions(&types.SetEntityPermissions{Entity: root, Permission: perms})

	pc := &propertyCollector{}
	pc.Self = content.PropertyCollector
	simulator.Map.Put(pc)

	simulator.Map.AddHandler(snapshotTasks{})

	lm := simulator.Map.Get(*content.LicenseManager).(*simulator.LicenseManager)
	lam := simulator.Map.Get(*lm.LicenseAssignmentManager).(*simulator.LicenseAssignmentManager)
	simulator.Map.Put(&licenceAssignment{lam, map[string]types.LicenseManagerLicenseInfo{}})

	// vcsim creates its model's shared datastores as type OTHER, mounted on the last host only
	// (each host's create replaces the object); the model means VMFS mounted on every host.
	for _, ref := range simulator.Map.All("Datastore") {
		ds := simulator.Map.Get(ref.Reference()).(*simulator.Datastore)
		if ds.Summary.Type != string(types.HostFileSystemVolumeFileSystemTypeOTHER) {
			continue
		}
		ds.Summary.Type = string(types.HostFileSystemVolumeFileSystemTypeVMFS)
		ds.Host = nil
		for _, href := range simulator.Map.All("HostSystem") {
			host := simulator.Map.Get(href.Reference()).(*simulator.HostSystem)
			if host.Name == noVMFSHost {
				host.Datastore = nil // only what is created on it later (NFS) is mounted there
				continue
			}
			for _, mounted := range host.Datastore {
				if mounted == ds.Self {
					ds.Host = append(ds.Host, types.DatastoreHostMount{Key: host.Self, MountInfo: types.HostMountInfo{
						Path: ds.Info.GetDatastoreInfo().Url, AccessMode: string(types.HostMountModeReadWrite),
						Mounted: types.NewBool(true), Accessible: types.NewBool(true),
					}})
				}
			}
		}
	}

	for _, ref := range simulator.Map.All("HostSystem") {
		host := simulator.Map.Get(ref.Reference()).(*simulator.HostSystem)
		dss := simulator.Map.Get(*host.ConfigManager.DatastoreSystem).(*simulator.HostDatastoreSystem)
		simulator.Map.Put(&datastoreSystem{dss})
	}
	return nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on (loopback)")
	usersJSON := flag.String("users", `{"admin":{"password":"admin-pass","role":"Admin"},`+
		`"readonly":{"password":"readonly-pass","role":"ReadOnly"}}`, "users as JSON: name -> {password, role}")
	novmfs := flag.String("novmfs-host", "DC0_H1", "a standalone host left without the shared VMFS datastore (RP-MT-VMFS)")
	flag.Parse()
	noVMFSHost = *novmfs
	if err := json.Unmarshal([]byte(*usersJSON), &users); err != nil {
		log.Fatalf("-users: %s", err)
	}

	model := simulator.VPX()
	model.Host = 2 // DC0_H0, and DC0_H1 which install() leaves without VMFS
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()
	if err := install(); err != nil {
		log.Fatal(err)
	}

	// vcsim's own server listens on a throwaway port; ours serves the same handlers behind the gate.
	model.Service.TLS = new(tls.Config)
	inner := model.Service.NewServer()
	defer inner.Close()

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	server := &http.Server{Handler: gate(model.Service.ServeMux)}
	go func() {
		if err := server.Serve(tls.NewListener(ln, inner.TLS)); err != http.ErrServerClosed {
			log.Fatal(err)
		}
	}()

	licences := map[string]string{}
	for key, info := range catalogue {
		licences[info.EditionKey] = key
	}
	out, _ := json.Marshal(map[string]interface{}{
		"url": "https://" + ln.Addr().String() + "/sdk", "host": "127.0.0.1",
		"port": ln.Addr().(*net.TCPAddr).Port, "users": users, "licences": licences,
	})
	fmt.Println(string(out))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	_ = server.Close()
}
